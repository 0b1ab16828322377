"""Tiny SD, SDXL and Flux pipelines built locally, with no download.

The tests and the demo need a base model; a real one is gigabytes behind a network we
may not have. These are the same diffusers/transformers classes at toy sizes, saved
with save_pretrained so the real from_pretrained path reads them back.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

SPECIALS = ("<|startoftext|>", "<|endoftext|>")
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"

# Sizes: "test" is diffusers' own fast-test configuration; "base" is the fill-circles base.
SIZES = {
    "test": {"unet": (4, 8), "vae": (4, 8), "vae_groups": 2, "unet_groups": 1, "text": 32, "heads": 2},
    # "test" with an SD-like VAE that downsamples x8 (4 blocks): diffusers' train_controlnet.py
    # builds its ControlNet with SD's x8 conditioning embedding, so it needs this one.
    "test-x8": {"unet": (4, 8), "vae": (4, 8, 8, 8), "vae_groups": 2, "unet_groups": 1, "text": 32, "heads": 2},
    # The fill-circles base (benchmarks/fill_circles/train_base.py): attention at 8x8 and 4x4.
    "base": {"unet": (32, 64, 64), "vae": (16, 32), "vae_groups": 8, "unet_groups": 8, "text": 64, "heads": 8,
             "down": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), "text_layers": 4},
}


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merge of one lowercase word (lowest-ranked pair first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, index = min(pairs)
        if rank == 1 << 30:
            break
        parts[index : index + 2] = [parts[index] + parts[index + 1]]
    return parts


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every word into one token, repaired until no word splits."""
    merges: list[tuple[str, str]] = []
    for _ in range(64):
        ranks = {pair: i for i, pair in enumerate(merges)}
        split = [(w, _bpe(w, ranks)) for w in words if len(_bpe(w, ranks)) > 1]
        if not split:
            return merges
        for _, parts in split:
            current = parts[0]
            for part in parts[1:]:
                if (current, part) not in ranks:
                    ranks[(current, part)] = len(merges)
                    merges.append((current, part))
                current += part
    raise RuntimeError("could not build word merges")


def write_word_tokenizer(out_dir: Path, words: list[str], max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary holds every letter and every given word."""
    words = sorted({w.lower() for w in words if w})
    merges = word_merges(words)
    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *LETTERS, *(c + "</w>" for c in LETTERS)]:
        vocab.setdefault(token, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n")
    return CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        model_max_length=max_length,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[1],
        pad_token=SPECIALS[1],
        unk_token=SPECIALS[1],
    )


def tiny_unet(dims: dict, **extra: object) -> UNet2DConditionModel:
    """The UNet at dims' sizes; `extra` adds config (SDXL's added embedding)."""
    down = dims.get("down", ("DownBlock2D", "CrossAttnDownBlock2D"))
    return UNet2DConditionModel(
        block_out_channels=dims["unet"],
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=tuple(name.replace("Down", "Up") for name in reversed(down)),
        cross_attention_dim=dims["text"],
        attention_head_dim=dims["heads"],
        norm_num_groups=dims["unet_groups"],
        **extra,
    )


def tiny_vae(dims: dict) -> AutoencoderKL:
    """One block per entry of dims["vae"]: latents at 1/2 the image size for two blocks,
    1/8 for four (the ControlNet stride must match)."""
    blocks = len(dims["vae"])
    return AutoencoderKL(
        block_out_channels=list(dims["vae"]),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=4,
        norm_num_groups=dims["vae_groups"],
    )


def tiny_text_encoder(dims: dict, vocab_size: int, layers: int, max_length: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=dims["text"],
        intermediate_size=dims["text"] * 2,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=layers,
        vocab_size=vocab_size,
        max_position_embeddings=max_length,
    )
    return CLIPTextModel(config)


def build_tiny_sd(
    out_dir: str | Path, words: list[str], size: str = "test", seed: int = 0, max_length: int = 77
) -> Path:
    """Build and save a random-weight SD pipeline (VAE, UNet, CLIP) to out_dir."""
    dims = SIZES[size]
    return save_random_sd(
        out_dir, words, seed, max_length,
        vae=lambda: tiny_vae(dims),
        text_encoder=lambda vocab: tiny_text_encoder(dims, vocab, dims.get("text_layers", 2), max_length),
        unet=lambda: tiny_unet(dims),
    )


def save_random_sd(
    out_dir: str | Path, words: list[str], seed: int, max_length: int,
    vae: Callable[[], AutoencoderKL], text_encoder: Callable[[int], CLIPTextModel],
    unet: Callable[[], UNet2DConditionModel],
) -> Path:
    """A word tokenizer and SD's DDPM schedule around the given part builders (seeded),
    saved as a diffusers pipeline; text_encoder takes the vocabulary size."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_word_tokenizer(Path(scratch), words, max_length)
    torch.manual_seed(seed)
    pipeline = StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        unet=unet(),
        scheduler=DDPMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            clip_sample=False, steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out)
    return out


# SDXL at toy sizes (diffusers' SDXL fast tests, smaller): two text encoders whose hidden
# sizes add up to the UNet's cross-attention width, the second with a projection (the
# pooled embedding), and the UNet's added embedding sized for pooled + 6 time ids. The
# encoders differ in width, as SDXL's do (768, 1280): the single-file layout tells them
# apart by it, and a projection of another size shows a transposed matrix.
SDXL_SIZES = {
    "test": {"unet": (4, 8), "vae": (4, 8), "vae_groups": 2, "unet_groups": 1, "text": 16, "text_2": 24,
             "projection": 12, "heads": 2, "time_dim": 4, "depth": (1, 2)},
    # the fill-circles base for SDXL (benchmarks/fill_circles/train_base.py --family sdxl)
    "base": {"unet": (32, 64, 64), "vae": (16, 32), "vae_groups": 8, "unet_groups": 8, "text": 32, "text_2": 48,
             "projection": 32, "heads": 8, "time_dim": 16, "depth": (1, 1, 2), "text_layers": 4,
             "down": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")},
}


def tiny_sdxl_unet(dims: dict) -> UNet2DConditionModel:
    return tiny_unet(
        {**dims, "text": dims["text"] + dims["text_2"]},  # cross-attention over both encoders
        transformer_layers_per_block=dims["depth"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=dims["time_dim"],
        projection_class_embeddings_input_dim=dims["projection"] + 6 * dims["time_dim"],
    )


def build_tiny_sdxl(out_dir: str | Path, words: list[str], size: str = "test", seed: int = 0,
                    max_length: int = 77) -> Path:
    """Build and save a random-weight SDXL pipeline (VAE, UNet, two CLIP encoders)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    dims = SDXL_SIZES[size]
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_word_tokenizer(Path(scratch), words, max_length)
    torch.manual_seed(seed)
    layers = dims.get("text_layers", 2)
    second = tiny_text_encoder({**dims, "text": dims["text_2"]}, len(tokenizer), layers, max_length).config
    second.projection_dim = dims["projection"]
    vae = tiny_vae(dims)
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(dims, len(tokenizer), layers, max_length),
        text_encoder_2=CLIPTextModelWithProjection(second),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=tiny_sdxl_unet(dims),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    pipeline.save_pretrained(out)
    return out


# Flux at toy sizes (diffusers' Flux fast tests): CLIP for the pooled embedding, T5 for the
# sequence, a VAE of one block (factor 1, one latent channel, shifted and scaled like
# FLUX.1's) and a transformer with one double and one single block; FLUX.1-dev's schedule.
FLUX_SIZES = {
    "test": {"vae": (4,), "vae_groups": 1, "latent_channels": 1, "text": 32, "t5": 32, "heads": 2,
             "head_dim": 16, "rope": (4, 4, 8), "double": 1, "single": 1},
    # the fill-circles Flux base (benchmarks/fill_circles/train_base.py --family flux): 4 heads
    # of 32, two dual- and two single-stream blocks over 2x2 patches of 16x16 latents
    "base": {"vae": (16, 32), "vae_groups": 8, "latent_channels": 4, "text": 64, "t5": 64, "heads": 4,
             "head_dim": 32, "rope": (8, 12, 12), "double": 2, "single": 2, "text_layers": 2},
    # another shape: a VAE of factor 2 with two latent channels
    "test-x2": {"vae": (4, 8), "vae_groups": 2, "latent_channels": 2, "text": 32, "t5": 32, "heads": 2,
                "head_dim": 16, "rope": (4, 4, 8), "double": 1, "single": 1},
}


def write_t5_tokenizer(out_dir: Path, words: list[str], max_length: int = 512) -> PreTrainedTokenizerBase:
    """A T5 (unigram, metaspace) tokenizer whose pieces are the given words, then letters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted({w.lower() for w in words if w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -1.0) for w in words),
              ("\u2581", -5.0), *((c, -10.0) for c in LETTERS)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_flux(out_dir: str | Path, words: list[str], size: str = "test", seed: int = 0,
                    guidance_embeds: bool = True, max_length: int = 77, t5_length: int = 512) -> Path:
    """Build and save a random-weight Flux pipeline (VAE, transformer, CLIP and T5);
    t5_length is the T5 tokenizer's model_max_length (the prompt length Flux trains at)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    dims = FLUX_SIZES[size]
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_word_tokenizer(Path(scratch) / "clip", words, max_length)
        tokenizer_2 = write_t5_tokenizer(Path(scratch) / "t5", words, t5_length)
    torch.manual_seed(seed)
    blocks = len(dims["vae"])
    vae = AutoencoderKL(
        block_out_channels=list(dims["vae"]), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=dims["latent_channels"], norm_num_groups=dims["vae_groups"], layers_per_block=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=dims["t5"], d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * dims["latent_channels"], num_layers=dims["double"],
        num_single_layers=dims["single"], attention_head_dim=dims["head_dim"], num_attention_heads=dims["heads"],
        joint_attention_dim=dims["t5"], pooled_projection_dim=dims["text"], guidance_embeds=guidance_embeds,
        axes_dims_rope=dims["rope"],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=tiny_text_encoder(dims, len(tokenizer), dims.get("text_layers", 2), max_length),
                            tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)
    pipeline.save_pretrained(out)
    return out


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
