"""An SD1.5-shaped pipeline with random weights, for the GPU benchmark: the real
architecture and sizes (UNet 859.5M, VAE 83.7M, CLIP ViT-L text encoder), saved with
save_pretrained so both trainers read it the way they read a Hub model. Only the
tokenizer is small (the benchmark's words), so the text encoder's token embedding is
too (85M parameters instead of 123M), which changes no step's cost. A ControlNet step
on it at 512 px counts 2.265 TFLOP per sample (torch's FlopCounterMode)."""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from difftune.families.sd.tiny import save_random_sd


def sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sd15_vae() -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=512,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )


def sd15_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))


def build_sd15(out_dir: Path, words: list[str], seed: int = 0) -> Path:
    """Build and save the pipeline (about 4.1 GB in fp32); kept if already there."""
    if (out_dir / "model_index.json").is_file():
        return out_dir
    return save_random_sd(out_dir, words, seed, 77, vae=sd15_vae, text_encoder=sd15_text_encoder, unet=sd15_unet)
