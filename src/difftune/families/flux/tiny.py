"""A random-weight FLUX.1 pipeline at toy sizes, built locally (tests, the fill-circles base)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from difftune.tiny import tiny_text_encoder, write_t5_tokenizer, write_word_tokenizer

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
