"""Train the tiny Qwen-Image-Edit-shaped fill-circles base on the CPU.

1. a random QwenImageEditPipeline at one of families/qwenimage/tiny.py's sizes ("bench": a VAE
   of factor 16; "megapixel": of factor 64), a two-layer Qwen2.5-VL with its vision tower, a
   three-block transformer;
2. the VAE trained to reconstruct fill-circles discs (drawn at 128 pixels, scaled to
   --resolution as the data loader scales them, seen in crops), its per-channel
   latents_mean / latents_std set from what it encodes;
3. the transformer trained text-to-image on fill-circles at --resolution with difftune's own
   `full` method (rows without a reference: QwenImagePipeline's prompt), then put back into
   the QwenImageEditPipeline folder (with its processor).

    python benchmarks/fill_circles_edit/train_qwen_base.py OUT [--size megapixel --resolution 1024]
        [--vae-steps 600] [--steps 3000] [--vae FOLDER]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLQwenImage

from difftune.config import build_config
from difftune.data.synthetic import DEMO_PALETTE, fill_circles_rows, write_fill_circles
from difftune.data.transforms import resize_to_cover
from difftune.families.qwenimage_edit.tiny import build_tiny_qwenimage_edit
from difftune.training.loop import train

WORDS = DEMO_PALETTE + ["circle", "with", "background", "make", "the"]
DRAWN = 128
"""The discs are drawn at 128 pixels (the committed data's size) and scaled up to the resolution."""


def crops(images: list, count: int, size: int, seed: int) -> torch.Tensor:
    """Random size-pixel crops in [-1, 1], (count, 3, 1, size, size) (the VAE is 3-D)."""
    rng = random.Random(seed)
    picked = []
    for _ in range(count):
        image = images[rng.randrange(len(images))]
        left, top = rng.randrange(image.width - size + 1), rng.randrange(image.height - size + 1)
        picked.append(np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32))
    return (torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2) / 127.5 - 1.0)[:, :, None]


def decode_unclamped(vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> torch.Tensor:
    """One frame decoded as AutoencoderKLQwenImage._decode does it, without its final clamp
    to [-1, 1]: trained through the clamp, a channel pushed past -1 (green's G beside black)
    gets no gradient back and the colour is lost for good."""
    vae.clear_cache()
    vae._conv_idx = [0]
    out = vae.decoder(vae.post_quant_conv(latents), feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


def grow_vae(small: AutoencoderKLQwenImage, levels: int = 2) -> AutoencoderKLQwenImage:
    """A VAE of factor 2 ** levels more than `small`, made from it: each new encoder level
    (before its last, which has no downsampler) is an identity residual block and 2x2
    average pooling; each new decoder level (after its first) an identity and a nearest 2x
    upsampling; every other weight is small's, in place. The trained factor-16 VAE so becomes
    a factor-64 one that reconstructs 1024-pixel discs at once (l1 0.06 before any step):
    trained from scratch (8 channels, no residual blocks, so nothing renormalises between its
    six stride-2 convolutions), the deeper VAE had learned almost nothing in 350 steps."""
    config = {k: v for k, v in small.config.items() if not k.startswith("_")}
    mult, flags = list(config["dim_mult"]), list(config["temperal_downsample"])
    # the new levels run spatially only, so the old ones keep their temporal flags (their time_conv)
    config |= {"dim_mult": mult + [mult[-1]] * levels, "temperal_downsample": flags + [False] * levels}
    big = AutoencoderKLQwenImage(**config)
    per_level = config["num_res_blocks"] + 1  # the encoder's down_blocks: residual blocks, then a downsampler
    first_new = per_level * (len(mult) - 1)  # where the old last level (no downsampler) began

    def moved(key: str) -> str:
        parts = key.split(".")
        if key.startswith("encoder.down_blocks.") and int(parts[2]) >= first_new:
            parts[2] = str(int(parts[2]) + per_level * levels)
        elif key.startswith("decoder.up_blocks.") and int(parts[2]) > 0:
            parts[2] = str(int(parts[2]) + levels)
        return ".".join(parts)

    state = big.state_dict()
    state.update({moved(key): value for key, value in small.state_dict().items()})
    big.load_state_dict(state)
    with torch.no_grad():
        for block in big.encoder.down_blocks[first_new:first_new + per_level * levels]:
            if hasattr(block, "resample"):  # ZeroPad2d((0, 1, 0, 1)), then a stride-2 3x3 convolution
                average_pooling(block.resample[1])
            else:
                block.conv2.weight.zero_()
                block.conv2.bias.zero_()
        for up in big.decoder.up_blocks[1:1 + levels]:
            for block in up.resnets:
                block.conv2.weight.zero_()
                block.conv2.bias.zero_()
                if not isinstance(block.conv_shortcut, torch.nn.Identity):  # channels in -> the first of out
                    weight = block.conv_shortcut.weight
                    weight.zero_()
                    block.conv_shortcut.bias.zero_()
                    channels = torch.arange(weight.shape[1])
                    weight[channels, channels] = 1.0
            conv = up.upsamplers[0].resample[1]  # after a nearest 2x upsampling: the first channels as they are
            conv.weight.zero_()
            conv.bias.zero_()
            channels = torch.arange(conv.weight.shape[0])
            conv.weight[channels, channels, 1, 1] = 1.0
    return big


def average_pooling(conv: torch.nn.Conv2d) -> None:
    """A stride-2 3x3 convolution (after ZeroPad2d((0, 1, 0, 1))) as 2x2 average pooling."""
    conv.weight.zero_()
    conv.bias.zero_()
    channels = torch.arange(conv.weight.shape[0])
    conv.weight[channels, channels, :2, :2] = 0.25


def train_vae(vae: AutoencoderKLQwenImage, images: list, steps: int, batch: int, crop: int, seed: int,
              lr: float = 5e-4) -> float:
    """Reconstruction (L1 + L2) with a light KL term; returns the last L1 error."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-5)  # settles the noise
    vae.train()
    for step in range(steps):
        x = crops(images, batch, crop, seed * 100_003 + step)
        posterior = vae.encode(x).latent_dist
        recon = decode_unclamped(vae, posterior.sample(generator=generator))
        l1 = (recon - x).abs().mean()
        loss = l1 + ((recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"vae step {step}: l1 {l1.item():.4f}", flush=True)
    vae.eval()
    return l1.item()


def set_latent_statistics(vae: AutoencoderKLQwenImage, images: list) -> None:
    """latents_mean / latents_std per channel, as Qwen-Image's VAE config carries them."""
    pixels = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images[:128]]))
    with torch.no_grad():
        means = torch.cat([vae.encode((chunk.permute(0, 3, 1, 2) / 127.5 - 1.0)[:, :, None]).latent_dist.mean
                           for chunk in pixels.split(8)])
    flat = means.transpose(0, 1).reshape(means.shape[1], -1)
    vae.register_to_config(latents_mean=flat.mean(1).tolist(), latents_std=flat.std(1).tolist())


def base_config(base: Path, data: Path, out: Path, steps: int, resolution: int) -> dict:
    return {
        "model": {"pretrained": str(base), "family": "qwenimage_edit"},
        "method": {"kind": "full"},
        "data": {"path": str(data), "resolution": resolution, "proportion_empty_prompts": 0.1,
                 "cache_latents": True},
        "train": {"output_dir": str(out), "seed": 0, "batch_size": 16, "max_steps": steps, "learning_rate": 5e-4,
                  "lr_scheduler": "cosine", "lr_warmup_steps": 200, "adam_weight_decay": 0.0,
                  "checkpoint_every": 1000, "checkpoints_total_limit": 1, "log_every": 50, "report_to": "none"},
        "validation": {"every": 1000, "num_images": 1, "steps": 20,
                       "prompts": ["red circle with blue background", "yellow circle with black background"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae", type=Path, help="a VAE folder to go on training from")
    parser.add_argument("--grow-from", type=Path, help="a VAE folder to grow by two levels (grow_vae) and train on")
    parser.add_argument("--transformer", type=Path, help="a transformer folder to start from (else random)")
    parser.add_argument("--size", default="bench", help="families/qwenimage/tiny.py's QWENIMAGE_SIZES key")
    parser.add_argument("--resolution", type=int, default=128, help="the targets' size in training")
    parser.add_argument("--crop", type=int, default=128, help="the VAE's training crops")
    parser.add_argument("--vae-lr", type=float, default=5e-4)
    parser.add_argument("--vae-batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    work = args.out / "work"
    data = work / "fill-circles"
    if not (data / "metadata.jsonl").is_file():
        write_fill_circles(data, args.samples, DRAWN, args.seed, colours=DEMO_PALETTE)
    initial = build_tiny_qwenimage_edit(work / "initial", WORDS, size=args.size, seed=args.seed)
    if args.transformer:
        shutil.rmtree(initial / "transformer")
        shutil.copytree(args.transformer, initial / "transformer")
    images = [resize_to_cover(image, (args.resolution, args.resolution)) for image in
              fill_circles_rows(512, DRAWN, args.seed + 1, DEMO_PALETTE)["image"]]
    if args.grow_from:
        vae = grow_vae(AutoencoderKLQwenImage.from_pretrained(args.grow_from))
    elif args.vae:
        vae = AutoencoderKLQwenImage.from_pretrained(args.vae)
    else:
        vae = AutoencoderKLQwenImage.from_pretrained(initial, subfolder="vae")
    vae_l1 = train_vae(vae, images, args.vae_steps, args.vae_batch, args.crop, args.seed + (1 if args.vae else 0),
                       args.vae_lr)
    set_latent_statistics(vae, images)
    vae.save_pretrained(initial / "vae")
    vae_minutes = (time.perf_counter() - started) / 60
    print(f"vae done: l1 {vae_l1:.4f}, {vae_minutes:.1f} min", flush=True)
    final = train(build_config(base_config(initial, data, work / "t2i-run", args.steps, args.resolution)))
    base = args.out / "base"
    if base.exists():
        shutil.rmtree(base)
    shutil.copytree(initial, base)  # the edit pipeline's folder, processor included
    shutil.rmtree(base / "transformer")
    shutil.copytree(final / "transformer", base / "transformer")
    summary = {"family": "qwenimage_edit", "minutes": round((time.perf_counter() - started) / 60, 1),
               "vae_minutes": round(vae_minutes, 1), "vae_l1": vae_l1, "steps": args.steps,
               "samples": args.samples, "resolution": args.resolution,
               "size": args.size, "crop": args.crop}
    (args.out / "base-training.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
