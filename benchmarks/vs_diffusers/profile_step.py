"""Where a ControlNet training step spends its time on the CPU benchmark's tiny pipeline
(test-x8, batch 8, 64 px, fp32, channels_last, fused AdamW): the whole step, the
ControlNet alone, and its conditioning embedding alone, then torch.profiler's top
operators. This is the work both tools must do per step, cache or not.

    python benchmarks/vs_diffusers/profile_step.py [--steps 30] [--no-channels-last] [--compile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch.profiler import profile

from difftune.tiny import build_tiny_sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models in place, as train.compile does")
    args = parser.parse_args()
    base = build_tiny_sd(Path(tempfile.mkdtemp()) / "base", ["circle"], size="test-x8", seed=0)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet)
    batch, side = args.batch, args.resolution // 8
    latents, noise = torch.randn(batch, 4, side, side), torch.randn(batch, 4, side, side)
    conditioning, text = torch.rand(batch, 3, args.resolution, args.resolution), torch.randn(batch, 77, 32)
    timesteps = torch.randint(0, 1000, (batch,))
    if not args.no_channels_last:
        for module in (unet, controlnet):
            module.to(memory_format=torch.channels_last)
        conditioning = conditioning.contiguous(memory_format=torch.channels_last)
    if args.compile:
        for module in (unet, controlnet):
            module.compile()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, fused=True)

    def whole_step() -> None:
        down, mid = controlnet(latents, timesteps, encoder_hidden_states=text, controlnet_cond=conditioning,
                               return_dict=False)
        prediction = unet(latents, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def controlnet_only() -> None:
        down, mid = controlnet(latents, timesteps, encoder_hidden_states=text, controlnet_cond=conditioning,
                               return_dict=False)
        (sum(d.mean() for d in down) + mid.mean()).backward()
        optimizer.zero_grad(set_to_none=True)

    def conditioning_embedding() -> None:
        controlnet.controlnet_cond_embedding(conditioning).mean().backward()
        optimizer.zero_grad(set_to_none=True)

    for name, run in (("whole step (fwd+bwd+AdamW)", whole_step), ("ControlNet fwd+bwd", controlnet_only),
                      ("conditioning embedding fwd+bwd", conditioning_embedding)):
        for _ in range(5):  # with --compile, the first call compiles
            run()
        started = time.perf_counter()
        for _ in range(args.steps):
            run()
        print(f"{name:32s} {(time.perf_counter() - started) / args.steps * 1000:6.1f} ms/step", flush=True)
    with profile() as profiler:
        for _ in range(5):
            whole_step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
