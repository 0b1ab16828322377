"""SDXL- and FLUX.1-shaped pipelines with random weights at full width and a chosen depth,
for memory measured per block (benchmarks/memory/methods.py). The denoiser has the real
widths, heads and embeddings; only its depth is a parameter, so that a quantity measured
at two depths extrapolates linearly to the real one. The text encoders have the real
widths (and so the real embedding sizes the denoiser takes) with one layer each, and a
small vocabulary (the benchmark's words); the VAE has the real latent channels and
downsampling (x8) with narrow blocks. Both are frozen and, with the caches, used only
before training, so they are not part of what the step holds.

SD1.5 needs none of this: benchmarks/sd15.py builds it whole."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from difftune.tiny import write_t5_tokenizer, write_word_tokenizer

SDXL_DEPTH = 10
"""Transformer layers per attention block at SDXL's deepest level (and its middle block)."""
FLUX_DEPTH = 19
"""FLUX.1's dual-stream blocks; it has twice as many single-stream ones."""


def sdxl_unet(depth: int) -> UNet2DConditionModel:
    """SDXL base's UNet with `depth` transformer layers per block at the deepest level
    (SDXL: 10; the other levels keep their 0 and 2)."""
    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, depth), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32,
    )


def narrow_vae(latent_channels: int, **config: float) -> AutoencoderKL:
    """Downsamples x8 (four blocks) to the real latent channels, 16 features wide."""
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 16, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8, **config)


def one_layer_clip(vocab: int, width: int, projection: int | None = None) -> torch.nn.Module:
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 4, num_hidden_layers=1,
                            num_attention_heads=width // 64, max_position_embeddings=77, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    if projection is None:
        return CLIPTextModel(config)
    config.projection_dim = projection
    return CLIPTextModelWithProjection(config)


def build_sdxl(out_dir: Path, words: list[str], depth: int, seed: int = 0) -> Path:
    """Saved in bf16 (the denoiser is 2.6B parameters at SDXL's depth); kept if there."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    if (out_dir / "model_index.json").is_file():
        return out_dir
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_word_tokenizer(Path(scratch), words)
    torch.manual_seed(seed)
    pipeline = StableDiffusionXLPipeline(
        vae=narrow_vae(4, scaling_factor=0.13025),
        text_encoder=one_layer_clip(len(tokenizer), 768), text_encoder_2=one_layer_clip(len(tokenizer), 1280, 1280),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=sdxl_unet(depth),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        add_watermarker=False,
    )
    pipeline.to(torch.bfloat16).save_pretrained(out_dir)
    return out_dir


def build_flux(out_dir: Path, words: list[str], depth: int, seed: int = 0) -> Path:
    """FLUX.1-dev's transformer with `depth` dual- and 2 x `depth` single-stream blocks,
    saved in bf16; T5 at full width (4096) with one layer, 512 tokens; kept if there."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    if (out_dir / "model_index.json").is_file():
        return out_dir
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_word_tokenizer(Path(scratch) / "clip", words)
        tokenizer_2 = write_t5_tokenizer(Path(scratch) / "t5", words, 512)
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                 num_heads=64, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=depth, num_single_layers=2 * depth, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipeline = FluxPipeline(scheduler=scheduler, vae=narrow_vae(16, shift_factor=0.1159, scaling_factor=0.3611,
                                                               use_quant_conv=False, use_post_quant_conv=False),
                            text_encoder=one_layer_clip(len(tokenizer), 768), tokenizer=tokenizer,
                            text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer)
    pipeline.to(torch.bfloat16).save_pretrained(out_dir)
    return out_dir
