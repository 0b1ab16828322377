"""A random-weight SDXL pipeline at toy sizes, built locally (tests, the fill-circles base)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from difftune.tiny import tiny_text_encoder, tiny_unet, tiny_vae, write_word_tokenizer

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
