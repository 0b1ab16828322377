"""A random-weight Qwen-Image pipeline at toy sizes, built locally (tests): a Qwen2.5-VL
text encoder with a vision tower (so the same encoder serves Qwen-Image-Edit), a
byte-level BPE tokenizer holding the pipelines' prompt templates word by word, Qwen-Image's
causal 3-D VAE and its MMDiT transformer. families/qwenimage_edit/tiny.py adds the processor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Qwen-Image at toy sizes (diffusers' Qwen-Image fast tests): 5 latent channels (not 3: the edit
# pipelines take an image of as many channels as the latents for latents), a VAE of
# factor 2 ** len(temperal_downsample), a two-layer Qwen2.5-VL whose vision tower is two
# blocks, a transformer of two blocks over 2x2 patches.
QWENIMAGE_SIZES: dict[str, dict[str, Any]] = {
    "test": {"z_dim": 5, "vae_base": 8, "temperal_downsample": (False, True, True), "text": 16, "text_heads": 2,
             "mrope": (1, 1, 2), "vision": 16, "heads": 2, "head_dim": 16, "rope": (8, 4, 4), "layers": 2},
    # the edit family's: a VAE of factor 16, so the pipelines' one-megapixel references make
    # 32x32 latent patches, not 64x64
    "edit": {"z_dim": 5, "vae_base": 8, "temperal_downsample": (False, True, True, False), "text": 16,
             "text_heads": 2, "mrope": (1, 1, 2), "vision": 16, "heads": 2, "head_dim": 16, "rope": (8, 4, 4),
             "layers": 2},
    # the fill-circles Qwen-Image-Edit base (benchmarks/fill_circles_edit/train_qwen_base.py):
    # a VAE of factor 16 with 16 latent channels (the pipelines' one-megapixel references make
    # 32x32 latent patches, a 128-pixel target 4x4), three blocks of 4 heads of 32
    "bench": {"z_dim": 16, "vae_base": 8, "temperal_downsample": (False, True, True, False), "text": 32,
              "text_heads": 2, "mrope": (2, 3, 3), "vision": 16, "heads": 4, "head_dim": 32, "rope": (16, 8, 8),
              "layers": 3},
    # the fill-circles Qwen-Image-Edit base at the pipelines' own sizes: "bench" with two more
    # levels, a VAE of factor 64, so a one-megapixel reference and a 1024-pixel target are both
    # 8x8 tokens: the same RoPE grid, as Qwen-Image-Edit itself is trained
    # (benchmarks/fill_circles_edit/train_qwen_base.py grows it from a "bench" VAE)
    "megapixel": {"z_dim": 16, "vae_base": 8, "vae_mult": (1, 2, 2, 2, 2, 2, 2),
                  "temperal_downsample": (False, True, True, False, False, False), "text": 32, "text_heads": 2,
                  "mrope": (2, 3, 3), "vision": 16, "heads": 4, "head_dim": 32, "rope": (16, 8, 8), "layers": 3},
}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")


def _bpe(piece: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """A byte-level BPE merge of one pre-token (lowest-ranked pair first)."""
    parts = list(piece)
    while len(parts) > 1:
        rank, index = min((ranks.get(pair, 1 << 30), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if rank == 1 << 30:
            break
        parts[index : index + 2] = [parts[index] + parts[index + 1]]
    return parts


def piece_merges(pieces: list[str]) -> list[tuple[str, str]]:
    """Merges that make every piece one token, repaired until none splits (a merge added for
    one piece can split another: the later merges join what the earlier ones leave)."""
    merges: list[tuple[str, str]] = []
    for _ in range(64):
        ranks = {pair: i for i, pair in enumerate(merges)}
        split = [parts for parts in (_bpe(p, ranks) for p in pieces) if len(parts) > 1]
        if not split:
            return merges
        for parts in split:
            current = parts[0]
            for part in parts[1:]:
                if (current, part) not in ranks:
                    ranks[(current, part)] = len(merges)
                    merges.append((current, part))
                current += part
    raise RuntimeError("could not build the merges")


def prompt_texts() -> list[str]:
    """The Qwen-Image pipelines' prompt templates (read from the pipelines, not copied), and
    what Edit Plus writes before each image."""
    from difftune.families.qwenimage.family import PICTURE, prompt_template

    pipelines = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline")
    return [PICTURE.format(1), *(prompt_template(name)[0] for name in pipelines)]


def write_qwen_tokenizer(out_dir: Path, words: list[str], max_length: int = 32768) -> Any:
    """A Qwen2Tokenizer (Qwen's pre-tokenizer and byte-level alphabet) whose merges make each
    word, and each pre-token of the pipelines' templates, one token, as Qwen's own
    vocabulary does: the text-to-image template's system prefix is then 34 tokens and the
    edit template's 64, the counts the pipelines drop."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    splitter = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer  # Qwen's regex, then byte-level
    import re

    # the text between the special tokens, as the tokenizer splits them off first
    texts = [t for text in prompt_texts() for t in re.split("|".join(map(re.escape, SPECIAL_TOKENS)), text)]
    words = sorted({w.lower() for w in words if w})
    texts += words + [" " + w for w in words]
    pieces = sorted({piece for text in texts for piece, _ in splitter.pre_tokenize_str(text)})
    merges = piece_merges(pieces)
    vocab: dict[str, int] = {}
    for token in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(token, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def tiny_qwen_vl(dims: dict[str, Any], tokenizer: Any) -> Any:
    """A Qwen2.5-VL of dims' sizes whose image and vision tokens are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {name: tokenizer.convert_tokens_to_ids(f"<|{token}|>") for name, token in
           (("image_token_id", "image_pad"), ("video_token_id", "video_pad"),
            ("vision_start_token_id", "vision_start"), ("vision_end_token_id", "vision_end"))}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": dims["text"], "intermediate_size": 2 * dims["text"],
                     "num_hidden_layers": 2, "num_attention_heads": dims["text_heads"],
                     "num_key_value_heads": dims["text_heads"], "max_position_embeddings": 4096,
                     "rope_scaling": {"mrope_section": list(dims["mrope"]), "rope_type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": None,
                     "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"depth": 2, "hidden_size": dims["vision"], "intermediate_size": 2 * dims["vision"],
                       "num_heads": 2, "out_hidden_size": dims["text"], "fullatt_block_indexes": [1]},
        **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def tiny_parts(dims: dict[str, Any], tokenizer: Any, seed: int) -> dict[str, Any]:
    """The VAE, text encoder, transformer and scheduler at dims' sizes."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(seed)
    z_dim, stages = dims["z_dim"], len(dims["temperal_downsample"])
    vae = AutoencoderKLQwenImage(
        base_dim=dims["vae_base"], z_dim=z_dim, dim_mult=list(dims.get("vae_mult", [1] + [2] * stages)),
        num_res_blocks=1, attn_scales=[],
        temperal_downsample=list(dims["temperal_downsample"]),
        # uneven on purpose: the latents are normalised per channel
        latents_mean=[0.1 * (c - 1) for c in range(z_dim)], latents_std=[1.0 + 0.25 * c for c in range(z_dim)])
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=dims["layers"],
        attention_head_dim=dims["head_dim"], num_attention_heads=dims["heads"], joint_attention_dim=dims["text"],
        axes_dims_rope=dims["rope"])
    # Qwen-Image's schedule: shifted by the image's token count, exponentially
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return {"vae": vae, "text_encoder": tiny_qwen_vl(dims, tokenizer), "transformer": transformer,
            "scheduler": scheduler}


def build_tiny_qwenimage(out_dir: str | Path, words: list[str], size: str = "test", seed: int = 0) -> Path:
    """Build and save a random-weight QwenImagePipeline (VAE, transformer, Qwen2.5-VL)."""
    import tempfile

    from diffusers import QwenImagePipeline

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_qwen_tokenizer(Path(scratch), words)
    QwenImagePipeline(tokenizer=tokenizer, **tiny_parts(QWENIMAGE_SIZES[size], tokenizer, seed)).save_pretrained(out)
    return out
