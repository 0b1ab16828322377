"""Train the tiny fill-circles base model from scratch on the CPU.

1. fill-circles images at 32 px in an 8-colour palette;
2. a word-level CLIP tokenizer (one token per colour) and a random CLIP text encoder;
3. a small KL VAE (x2 downsampling) trained to reconstruct those images;
4. the UNet trained from random weights with difftune's own `full` method.

The result is a diffusers pipeline folder (safetensors) that the demo ControlNet uses.
`--family sdxl` builds an SDXL-architecture base instead (two text encoders, the pooled
embedding and time ids), `--family flux` a Flux one (CLIP + T5, a flow-matching
transformer over 2x2 patches), `--family cogview4` a CogView4 one (GLM, a flow-matching
transformer with size conditioning) and `--family sd3` an SD3 one (two CLIPs and T5, an
MMDiT with the scheduler's static shift), each trained the same way through its family.

    python benchmarks/fill_circles/train_base.py OUT_DIR [--family sd|sdxl|flux|cogview4|sd3] [--unet-steps 6000]
        [--vae FOLDER]   (reuse a trained fill-circles VAE instead of training one)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from difftune.config import build_config
from difftune.data.synthetic import DEMO_PALETTE, write_fill_circles
from difftune.families.cogview4.tiny import build_tiny_cogview4
from difftune.families.flux.tiny import build_tiny_flux
from difftune.families.sd.tiny import build_tiny_sd
from difftune.families.sd3.tiny import build_tiny_sd3
from difftune.families.sdxl.tiny import build_tiny_sdxl
from difftune.training.loop import train


def build_flux_base(out: Path, words: list[str], size: str, seed: int, max_length: int) -> Path:
    """Flux without a guidance embedding (a from-scratch base learns no distilled guidance;
    like schnell), its T5 at the prompt length too."""
    return build_tiny_flux(out, words, size=size, seed=seed, guidance_embeds=False, max_length=max_length,
                           t5_length=max_length)


def build_cogview4_base(out: Path, words: list[str], size: str, seed: int, max_length: int) -> Path:
    """CogView4 takes no prompt length: its pipeline pads each prompt to a multiple of 16 tokens."""
    return build_tiny_cogview4(out, words, size=size, seed=seed)


def build_sd3_base(out: Path, words: list[str], size: str, seed: int, max_length: int) -> Path:
    """SD3 with its T5 at the prompt length too (the pipeline pads T5 to 256 tokens otherwise)."""
    return build_tiny_sd3(out, words, size=size, seed=seed, max_length=max_length, t5_length=max_length)


BUILDERS = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "flux": build_flux_base, "cogview4": build_cogview4_base,
            "sd3": build_sd3_base}

PALETTE = DEMO_PALETTE
WORDS = PALETTE + ["circle", "with", "background"]
RESOLUTION = 32


def load_images(folder: Path, limit: int) -> torch.Tensor:
    """Target images in [-1, 1], N x 3 x H x W."""
    import numpy as np
    from PIL import Image

    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()][:limit]
    arrays = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB"), dtype=np.float32) for r in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch: int, seed: int) -> float:
    """Reconstruction (L1 + L2) with a light KL term; returns the final L1 error."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        pick = torch.randint(0, len(images), (batch,), generator=generator)
        x = images[pick]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        l1 = (recon - x).abs().mean()
        loss = l1 + ((recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"vae step {step}: l1 {l1.item():.4f}", flush=True)
    vae.eval()
    return l1.item()


def set_latent_scale(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """scaling_factor = 1 / std of the latents, as SD's VAE was calibrated (Rombach et al. 2022)."""
    with torch.no_grad():
        latents = vae.encode(images[:512]).latent_dist.mode()
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    return scale


def unet_config(base: Path, data: Path, out: Path, steps: int, family: str = "sd") -> dict:
    return {
        "model": {"pretrained": str(base), "family": family},
        "method": {"kind": "full"},
        "data": {"path": str(data), "resolution": RESOLUTION, "proportion_empty_prompts": 0.1},
        "train": {
            "output_dir": str(out), "seed": 0, "batch_size": 32, "max_steps": steps,
            "learning_rate": 5e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 200,
            "adam_weight_decay": 0.0, "checkpoint_every": 1000, "checkpoints_total_limit": 1,
            "log_every": 50, "report_to": "tensorboard",
        },
        "validation": {
            "every": 1000, "num_images": 2, "steps": 20, "guidance_scale": 4.0,
            "prompts": ["red circle with blue background", "yellow circle with black background",
                        "white circle with purple background", "green circle with orange background"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(BUILDERS), default="sd")
    parser.add_argument("--vae", type=Path, help="a trained fill-circles VAE folder to reuse")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    work = args.out / "work"
    data = work / "fill-circles"
    if not (data / "metadata.jsonl").is_file():
        write_fill_circles(data, args.samples, RESOLUTION, args.seed, colours=PALETTE)
    initial = BUILDERS[args.family](work / "initial", WORDS, size="base", seed=args.seed, max_length=8)
    images = load_images(data, 4096)
    if args.vae is None:
        vae = AutoencoderKL.from_pretrained(initial, subfolder="vae")
        vae_l1 = train_vae(vae, images, args.vae_steps, 32, args.seed)
        scale = set_latent_scale(vae, images)
    else:
        vae = AutoencoderKL.from_pretrained(args.vae)
        vae_l1, scale = float("nan"), vae.config.scaling_factor
        if args.family in ("flux", "sd3") and vae.config.shift_factor is None:
            vae.register_to_config(shift_factor=0.0)  # Flux's and SD3's pipelines shift latents back when they decode
    vae.save_pretrained(initial / "vae")
    print(f"vae done: l1 {vae_l1:.4f}, scaling_factor {scale:.4f}, {time.perf_counter() - started:.0f}s", flush=True)
    final = train(build_config(unet_config(initial, data, work / "unet-run", args.unet_steps, args.family)))
    final_dir = args.out / "base"
    from diffusers import DiffusionPipeline

    DiffusionPipeline.from_pretrained(final).save_pretrained(final_dir, safe_serialization=True)
    summary = {"family": args.family, "minutes": round((time.perf_counter() - started) / 60, 1),
               "vae_l1": vae_l1, "vae": str(args.vae) if args.vae else "trained", "scaling_factor": scale,
               "unet_steps": args.unet_steps, "samples": args.samples}
    (args.out / "base-training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
