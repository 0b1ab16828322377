"""A random-weight SD3 pipeline at toy sizes, built locally (no download) and saved with
save_pretrained, so the real from_pretrained path reads it back (as difftune/tiny.py's).

The sizes are odd on purpose, so that a number written into the family's code instead
of read from a config shows: 3 latent channels (SD3's VAE has 16), a VAE factor of 2
(SD3's: 8), two CLIPs of different widths whose hidden states together are narrower than
T5 (the pipeline pads them to its width), pooled widths that add up to the transformer's
pooled_projection_dim, and the scheduler's static shift of SD3.5 (3.0).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SIZES = {
    # the first block is an MMDiT-X block (SD3.5 Medium's dual attention) with RMS q/k norms
    "test": {"vae": (4, 8), "vae_groups": 2, "latent_channels": 3, "clip": 16, "clip_2": 24, "projection": 12,
             "projection_2": 20, "t5": 48, "heads": 2, "head_dim": 8, "layers": 2, "patch": 2,
             "dual_attention_layers": (0,), "qk_norm": "rms_norm", "sample_size": 32, "text_layers": 2},
    # the fill-circles SD3 base (benchmarks/fill_circles/train_base.py --family sd3): 4 heads of 32
    # in three joint blocks over 2x2 patches of the 16x16 latents of the SD base's VAE
    "base": {"vae": (16, 32), "vae_groups": 8, "latent_channels": 4, "clip": 32, "clip_2": 48, "projection": 32,
             "projection_2": 32, "t5": 96, "heads": 4, "head_dim": 32, "layers": 3, "patch": 2,
             "dual_attention_layers": (), "qk_norm": None, "sample_size": 16, "text_layers": 2},
}


def build_tiny_sd3(out_dir: str | Path, words: list[str], size: str = "test", seed: int = 0, max_length: int = 77,
                   t5_length: int = 77, shift: float = 3.0) -> Path:
    """Build and save a random-weight StableDiffusion3Pipeline (VAE, transformer, CLIP-L,
    CLIP-G and T5); max_length is the CLIP tokenizers' (the pipeline cuts both CLIPs at the
    first one's), t5_length the T5 tokenizer's model_max_length (the pipeline's
    max_sequence_length where it is below 256)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from difftune.tiny import tiny_text_encoder, write_t5_tokenizer, write_word_tokenizer

    dims = SIZES[size]
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_word_tokenizer(Path(scratch) / "clip", words, max_length)
        tokenizer_3 = write_t5_tokenizer(Path(scratch) / "t5", words, t5_length)
    torch.manual_seed(seed)
    layers = dims["text_layers"]

    def clip(width: int, projection: int) -> CLIPTextModelWithProjection:
        config = tiny_text_encoder({"text": width}, len(tokenizer), layers, max_length).config
        config.projection_dim = projection
        return CLIPTextModelWithProjection(config)

    blocks = len(dims["vae"])
    vae = AutoencoderKL(
        block_out_channels=list(dims["vae"]), in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
        latent_channels=dims["latent_channels"], norm_num_groups=dims["vae_groups"], layers_per_block=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,  # SD3's
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=dims["t5"], d_kv=8, d_ff=37, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    inner = dims["heads"] * dims["head_dim"]
    transformer = SD3Transformer2DModel(
        sample_size=dims["sample_size"], patch_size=dims["patch"], in_channels=dims["latent_channels"],
        out_channels=dims["latent_channels"], num_layers=dims["layers"], attention_head_dim=dims["head_dim"],
        num_attention_heads=dims["heads"], joint_attention_dim=dims["t5"], caption_projection_dim=inner,
        pooled_projection_dim=dims["projection"] + dims["projection_2"], pos_embed_max_size=dims["sample_size"],
        dual_attention_layers=dims["dual_attention_layers"], qk_norm=dims["qk_norm"],
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
        text_encoder=clip(dims["clip"], dims["projection"]), tokenizer=tokenizer,
        text_encoder_2=clip(dims["clip_2"], dims["projection_2"]), tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(out)
    return out
