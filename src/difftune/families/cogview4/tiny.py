"""A random-weight CogView4 pipeline at toy sizes, built locally (tests, the fill-circles
base), with a word-level GLM-like tokenizer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import PreTrainedTokenizerBase

# CogView4 at toy sizes (diffusers' CogView4 fast tests): a GLM text encoder, a VAE and a
# transformer over 2x2 patches; the scheduler's linear, size-dependent shift.
COGVIEW4_SIZES = {
    "test": {"vae": (4, 8), "vae_groups": 2, "latent_channels": 4, "text": 32, "heads": 4, "head_dim": 4,
             "layers": 2, "time": 8, "condition": 4},
    # the fill-circles CogView4 base (benchmarks/fill_circles/train_base.py --family cogview4):
    # 4 heads of 32 in four blocks over 2x2 patches of 16x16 latents, a two-layer GLM of 64
    "base": {"vae": (16, 32), "vae_groups": 8, "latent_channels": 4, "text": 64, "heads": 4, "head_dim": 32,
             "layers": 4, "time": 64, "condition": 16, "text_ffn": 128, "text_head_dim": 16},
}


def write_glm_tokenizer(out_dir: Path, words: list[str], max_length: int = 1024) -> PreTrainedTokenizerBase:
    """A word-level fast tokenizer (pad, eos, unknown, a start token that begins every
    prompt as GLM's [gMASK]<sop> do, then the words), padding on the left like GLM's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "<sop>": 3}
    for word in sorted({w.lower() for w in words if w}):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<sop> $A", special_tokens=[("<sop>", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>", padding_side="left", model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_cogview4(out_dir: str | Path, words: list[str], size: str = "test", seed: int = 0) -> Path:
    """Build and save a random-weight CogView4 pipeline (VAE, transformer, GLM)."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    dims = COGVIEW4_SIZES[size]
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_glm_tokenizer(Path(scratch), words)
    torch.manual_seed(seed)
    blocks = len(dims["vae"])
    vae = AutoencoderKL(
        block_out_channels=list(dims["vae"]), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=dims["latent_channels"], norm_num_groups=dims["vae_groups"],
    )
    glm = GlmModel(GlmConfig(vocab_size=len(tokenizer), hidden_size=dims["text"],
                             intermediate_size=dims.get("text_ffn", 8), num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=dims.get("text_head_dim", 8),
                             pad_token_id=0, eos_token_id=1))
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=dims["latent_channels"], out_channels=dims["latent_channels"],
        num_layers=dims["layers"], attention_head_dim=dims["head_dim"], num_attention_heads=dims["heads"],
        text_embed_dim=dims["text"], time_embed_dim=dims["time"], condition_dim=dims["condition"],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    CogView4Pipeline(tokenizer=tokenizer, text_encoder=glm, vae=vae, transformer=transformer,
                     scheduler=scheduler).save_pretrained(out)
    return out
