"""A random-weight Stable Diffusion pipeline at toy sizes, built locally (tests, the
fill-circles base); save_random_sd around any part builders (benchmarks' SD1.5 shape)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from difftune.tiny import tiny_text_encoder, tiny_unet, tiny_vae, write_word_tokenizer

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
