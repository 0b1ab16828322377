"""Is difftune's loop at its bound? Two measurements on the CPU benchmark's tiny pipeline
(test-x8, batch 8, 64 px, fp32; difftune's defaults: channels_last, fused AdamW, the
caches it chooses).

1. The loop against the bare step (the issue's target: >= 90%). A real `Run` trains the
   ControlNet for --loop-steps steps; its steady step time comes from the wall times of
   its own `step` events (step 10 to the last), so it holds everything the loop does per
   step: loading the batch, noise and timesteps, the forward and backward, the non-finite
   checks, clipping, the optimizer and schedule, logging, the thread governor. The bare
   step is the same modules of that run (its UNet, its ControlNet, channels_last as the
   run left them) on one batch of its own loader, with the noise drawn once: the
   ControlNet and UNet forward, the MSE, backward, and the same optimizer (fused AdamW)
   stepping, nothing else, timed just before and just after the run's training. Three
   rounds; the ratio is bare / loop, per round, and its median.

2. --breakdown: where the step spends its time (built outside difftune from diffusers'
   classes): the whole step, the ControlNet alone, its conditioning embedding alone,
   then torch.profiler's top operators. This is the work both tools must do per step.

    python benchmarks/vs_diffusers/profile_step.py [--loop-steps 210] [--bare-steps 50] [--breakdown]
        [--no-channels-last] [--compile] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch.profiler import profile

from difftune.config import build_config
from difftune.data.synthetic import DEMO_PALETTE, write_fill_circles_parquet
from difftune.families.sd.tiny import build_tiny_sd
from difftune.training.loop import Run
from difftune.training.optim import make_optimizer
from difftune.training.step import denoiser_inputs

WORDS = DEMO_PALETTE + ["circle", "with", "background"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loop-steps", type=int, default=210)
    parser.add_argument("--bare-steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true", help="also the per-module breakdown and the profiler")
    parser.add_argument("--steps", type=int, default=30, help="steps of each --breakdown timing")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models, as train.compile does")
    parser.add_argument("--out", type=Path, default=None, help="write the loop-against-bare record here as JSON")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="profile-step-"))
    base = build_tiny_sd(work / "base", WORDS, size="test-x8", seed=0)
    data = write_fill_circles_parquet(work / "data", 512, args.resolution, seed=0, colours=DEMO_PALETTE)
    record = loop_against_bare(work, base, data, args)
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    if args.breakdown:
        breakdown(base, args)


def loop_against_bare(work: Path, base: Path, data: Path, args: argparse.Namespace) -> dict:
    rounds = []
    for round_ in range(args.rounds):
        run = Run(build_config({
            "model": {"pretrained": str(base)},
            "method": {"kind": "controlnet"},
            "data": {"path": str(data), "resolution": args.resolution, "encoded_cache_dir": str(work / "cache")},
            "train": {"output_dir": str(work / f"run-{round_}"), "seed": 0, "batch_size": args.batch,
                      "max_steps": args.loop_steps, "learning_rate": 1e-5, "lr_warmup_steps": 0,
                      "checkpoint_every": 1_000_000, "log_every": 10, "channels_last": not args.no_channels_last,
                      "compile": args.compile},
        }))
        run.sampler.start_epoch(0, 0)
        batch = next(iter(run.loader))
        # the bare step just before and just after the loop, so drift in the machine's
        # speed (this box's moves by 10-20% within minutes) hits both alike
        before = bare_step_ms(run, batch, args.bare_steps)
        run.fit()
        loop_ms = steady_step_ms(run.run_dir / "events.jsonl")
        after = bare_step_ms(run, batch, args.bare_steps)
        bare_ms = (before + after) / 2
        rounds.append({"loop_ms": round(loop_ms, 2), "bare_ms": round(bare_ms, 2),
                       "bare_ms_before_after": [round(before, 2), round(after, 2)], "ratio": round(bare_ms / loop_ms, 3)})
        print(f"round {round_}: loop {loop_ms:.1f} ms/step, bare {bare_ms:.1f} ms/step, "
              f"bare/loop {bare_ms / loop_ms:.3f}", flush=True)
    settings = {name: getattr(args, name) for name in ("loop_steps", "bare_steps", "batch", "resolution", "compile")}
    settings["channels_last"] = not args.no_channels_last
    return {"settings": settings, "threads": torch.get_num_threads(), "rounds": rounds,
            "ratio_median": round(statistics.median(r["ratio"] for r in rounds), 3)}


def steady_step_ms(events: Path, first_step: int = 10) -> float:
    """Mean wall time of a step between step `first_step` and the last logged one."""
    steps = [line for line in map(json.loads, events.read_text().splitlines()) if line["event"] == "step"]
    steps = [s for s in steps if s["step"] >= first_step]
    first, last = steps[0], steps[-1]
    return (last["time"] - first["time"]) / (last["step"] - first["step"]) * 1000


def bare_step_ms(run: Run, batch: dict, steps: int) -> float:
    """The run's own modules on one batch of its own loader: forward, MSE, backward and a
    step of an optimizer made as the run makes its own, nothing else."""
    trainee = run.trainee
    family, method, parts, trained = trainee.family, trainee.method, trainee.step_parts, trainee.trained
    with torch.no_grad():  # drawn once: the bare step is the denoiser's work alone
        fixed, noised = denoiser_inputs(trainee, batch, 0)
    params = [p for module in trained.values() for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, run.config.train, 1)

    def step() -> None:
        inputs = method.condition(family, parts, trained, batch, fixed)
        torch.nn.functional.mse_loss(family.predict(parts, inputs), noised.target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps * 1000


def breakdown(base: Path, args: argparse.Namespace) -> None:
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
