"""What a perfect LCM-LoRA student would score (issue 28's diagnosis): LCMScheduler's
few-step sampling, as check.py samples the LoRA, with the student replaced by the exact
function it is distilled to, the guided teacher's DDIM chain down the solver grid.

At each of LCMScheduler's timesteps t, the "student" walks the base (the teacher) from the
current sample down the grid's points below t to 0, guided DDIM jumps (substeps each) at
classifier-free scale g (diffusers' convention: uncond + g (cond - uncond), the distill
settings' w + 1), and hands the chain's end to LCMScheduler.step as its x0; the scheduler
re-noises it to the next timestep with the prompt's generator, as in the pipeline. Scored
with check.py's colour IoU on the held-out captions, one seed per caption (seed + index).

    python benchmarks/lcm/ceiling.py GRID,SUBSTEPS,SCALE [...] [--out RESULT.json]
    python benchmarks/lcm/ceiling.py 4,1,4 4,1,6 4,2,4 50,1,4

A score near the teacher's own 25 steps says the grid loses nothing and what a trained
LoRA misses is learning; a low one says the targets themselves are poor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check  # noqa: E402  (the benchmark's metric and held-out captions)


def chain_end(unet, alphas: torch.Tensor, text: torch.Tensor, sample: torch.Tensor, t: int,
              points: list[int], substeps: int, scale: float) -> torch.Tensor:
    """The guided DDIM chain from `sample` at t through the grid points below t to 0 (the
    last jump ends at alphas_cumprod[0], as the distillation's does)."""
    here = t
    for point in sorted((p for p in points if p < t), reverse=True) + [0]:
        current = here
        for there in [here - round((here - point) * j / substeps) for j in range(1, substeps + 1)]:
            timestep = torch.full((sample.shape[0],), current)
            both = unet(torch.cat([sample, sample]), torch.cat([timestep, timestep]), encoder_hidden_states=text).sample
            cond, uncond = both.chunk(2)
            eps = uncond + scale * (cond - uncond)
            a, b = alphas[current], alphas[there]
            x0 = (sample - (1 - a).sqrt() * eps) / a.sqrt()
            sample = b.sqrt() * x0 + (1 - b).sqrt() * eps
            current = there
        here = point
    return sample


@torch.no_grad()
def ideal_student_scores(base: str, prompts: list[str], grid: int, substeps: int, scale: float,
                         size: int, steps: int = 4, seed: int = 0) -> dict[str, float]:
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    if pipe.scheduler.config.prediction_type != "epsilon":
        raise SystemExit(f"{base}: ceiling.py reads the UNet's output as epsilon; this base predicts "
                         f"{pipe.scheduler.config.prediction_type!r}")
    unet, alphas = pipe.unet, pipe.scheduler.alphas_cumprod.float()
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[""] * len(prompts))
    text = torch.cat([cond, uncond])
    train_steps = pipe.scheduler.config.num_train_timesteps
    skip = train_steps // grid
    points = [skip * i - 1 for i in range(1, grid + 1)]
    scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    latent = size // pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, latent, latent)
    sample = torch.cat([torch.randn(shape, generator=generator) for generator in generators])
    for t in scheduler.timesteps.tolist():
        x0 = chain_end(unet, alphas, text, sample, t, points, substeps, scale)
        eps = (sample - alphas[t].sqrt() * x0) / (1 - alphas[t]).sqrt()  # what LCMScheduler reads x0 back from
        output = scheduler.step(eps, t, sample, generator=generators)
        sample, denoised = output.prev_sample, output.denoised
    decoded = pipe.vae.decode(denoised / pipe.vae.config.scaling_factor).sample
    images = pipe.image_processor.postprocess(decoded, output_type="pil")
    return check.summarise([check.prompt_colour_scores(image, prompt) for image, prompt in zip(images, prompts)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("specs", nargs="+", help="GRID,SUBSTEPS,SCALE: solver points, DDIM steps per jump, "
                                                 "classifier-free scale (w + 1)")
    parser.add_argument("--base", default="assets/fill-circles-base")
    parser.add_argument("--held-out", default="assets/fill-circles/held-out")
    parser.add_argument("--size", type=int, default=32, help="the base's training resolution")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    prompts, _ = check.held_out(args.held_out, None)
    results = {}
    for spec in args.specs:
        grid, substeps, scale = spec.split(",")
        results[spec] = ideal_student_scores(args.base, prompts, int(grid), int(substeps), float(scale),
                                               args.size)
        print(spec, results[spec], flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "prompts": len(prompts),
                                        "ideal_student_lcm@4": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
