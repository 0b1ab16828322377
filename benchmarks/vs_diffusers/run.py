"""difftune against diffusers' own examples/controlnet/train_controlnet.py, side by side.

Both train a ControlNet on the same tiny SD pipeline (built here, random weights) and the
same fill-circles data as one parquet file, with the same batch, resolution, learning
rate and steps, in the same Python, alternating runs. Neither validates; both save the
final ControlNet. Throughput is measured by difference, so start-up (imports, model
loading, dataset opening, a cache being built) cancels out:

    samples/s = (long - short steps) x batch / (wall time of long run - wall time of short run)

A second figure needs no short run: the steady rate inside each long run, from the
wall times both tools write with their loss to tensorboard (from step 10 to the last).
The two agree within the noise on the CPU; --short 0 keeps only the second (GPU mode's
default, which halves the runs).

Peak RSS is the largest resident memory of the run's whole process tree (sampled every
20 ms), from the long runs.

train_controlnet.py needs torchvision, which does not import beside this box's CPU
torch 2.13, so run this from an environment with both:

    python -m venv /tmp/vbench
    /tmp/vbench/bin/pip install torch==2.14.1 torchvision==0.29.1 && /tmp/vbench/bin/pip install -e .
    /tmp/vbench/bin/python benchmarks/vs_diffusers/run.py --train-controlnet PATH/TO/diffusers/examples/controlnet/train_controlnet.py

It prints and writes (--out) a JSON record with both tools' samples/s and peak RSS, and
the ratios, for difftune as configured by default and with a warm latent and text cache.
"difftune" sets no speed option: it chooses its caches itself, and each of its runs starts
with an empty cache folder ($DIFFTUNE_CACHE), so that it builds them inside the timed run,
as a first run does. "difftune_cached" sets both caches on in a folder filled by an untimed
run first. whole_process_ratio_vs_diffusers compares the long runs' wall times whole,
start-up and cache building included.

GPU mode (--gpu): the same comparison on an SD1.5-shaped pipeline with random weights
(sd15.py) at 512 px in bf16, batch 16, with 8 loader workers for the uncached runs of
both tools. It adds each run's peak GPU memory (nvidia-smi, the process tree's, so the
CUDA context and the allocator's reserve count) and MFU: samples/s x 2.27 TFLOP (an
SD1.5 ControlNet step per sample, VAE encoding not counted; shared performance notes)
over the GPU's dense bf16 peak. --compile adds a run with train.compile = true.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

from difftune.config import build_config, to_toml
from difftune.data.synthetic import DEMO_PALETTE, write_fill_circles_parquet
from difftune.families.sd.tiny import build_tiny_sd

sys.path.insert(0, str(Path(__file__).parent.parent))  # benchmarks/sd15.py and measure.py
from measure import measure
from sd15 import build_sd15

WORDS = DEMO_PALETTE + ["circle", "with", "background"]
STEP_TFLOP_PER_SAMPLE = 2.27  # an SD1.5 ControlNet training step at 512 px, without the VAE
# by name, most specific first ("H100 PCIe" and "H100 NVL" before "H100")
DENSE_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0,
                     "L40S": 362.0}


def diffusers_command(script: Path, base: Path, data: Path, out: Path, steps: int, args: argparse.Namespace) -> list[str]:
    return [
        args.python, str(script),
        "--pretrained_model_name_or_path", str(base),
        "--train_data_dir", str(data),
        "--output_dir", str(out),
        "--resolution", str(args.resolution),
        "--train_batch_size", str(args.batch),
        "--max_train_steps", str(steps),
        "--learning_rate", "1e-5",
        "--checkpointing_steps", "1000000",
        "--seed", "0",
        "--dataloader_num_workers", str(args.workers),
        "--mixed_precision", args.precision,
        "--report_to", "tensorboard",
    ]


def difftune_config(base: Path, data: Path, out: Path, steps: int, args: argparse.Namespace, cache: Path | None,
                    compile_: bool = False) -> str:
    """The run's config as TOML, validated before anything launches. Cached runs keep
    difftune's own loader default (0 workers on the CPU, 2 on a GPU), as a user would."""
    data_keys: dict = {"path": str(data), "resolution": args.resolution}
    if cache:
        data_keys.update(cache_latents=True, cache_text=True, encoded_cache_dir=str(cache))
    else:
        data_keys["num_workers"] = args.workers
    return to_toml(build_config({
        "model": {"pretrained": str(base)},
        "method": {"kind": "controlnet"},
        "data": data_keys,
        "train": {"output_dir": str(out), "seed": 0, "batch_size": args.batch, "max_steps": steps,
                  "learning_rate": 1e-5, "lr_warmup_steps": 0, "checkpoint_every": 1_000_000,
                  "report_to": "tensorboard", "log_every": 10, "mixed_precision": args.precision,
                  "compile": compile_},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-controlnet", type=Path, required=True, help="diffusers' examples/controlnet/train_controlnet.py")
    parser.add_argument("--python", default=sys.executable, help="the interpreter both run in")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--gpu", action="store_true",
                        help="GPU mode: defaults become --size sd15 --resolution 512 --precision bf16 --batch 16 "
                             "--workers 8, and GPU memory and MFU are measured")
    parser.add_argument("--size", choices=["test-x8", "sd15"], default=None,
                        help="test-x8: diffusers' fast-test sizes with a VAE that downsamples x8 (train_controlnet.py's "
                             "ControlNet assumes SD's x8); sd15: SD1.5's architecture with random weights")
    parser.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None, help="mixed precision of both")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="loader workers of the uncached runs (both tools)")
    parser.add_argument("--samples", type=int, default=512, help="rows in the parquet dataset")
    parser.add_argument("--short", type=int, default=None, help="steps of the short runs (0: none)")
    parser.add_argument("--long", type=int, default=None, help="steps of the long runs")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="add a cached difftune run with train.compile = true")
    parser.add_argument("--tools", nargs="+", default=None, help="run only these (diffusers always runs)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here too")
    args = parser.parse_args()
    apply_mode_defaults(args)

    work = args.work or Path(tempfile.mkdtemp(prefix="vs-diffusers-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.size == "sd15":
        base = build_sd15(work / "base-sd15", WORDS)
    else:
        base = build_tiny_sd(work / "base", WORDS, size=args.size, seed=0)
    data = write_fill_circles_parquet(work / f"data-{args.resolution}", args.samples, args.resolution, seed=0,
                                      colours=DEMO_PALETTE)
    cache = work / "cache"  # the warm cache of the difftune_cached rows, filled before they are timed
    tools = {
        "diffusers": lambda out, steps: diffusers_command(args.train_controlnet, base, data, out, steps, args),
        "difftune": lambda out, steps: _difftune(work, base, data, out, steps, args, None),
        "difftune_cached": lambda out, steps: _difftune(work, base, data, out, steps, args, cache),
    }
    if args.compile:
        tools["difftune_cached_compiled"] = lambda out, steps: _difftune(work, base, data, out, steps, args, cache, True)
    if args.tools:
        tools = {name: run for name, run in tools.items() if name == "diffusers" or name in args.tools}
    if "difftune_cached" in tools:
        # Untimed: fills the warm cache, so that every timed cached run finds it (else the
        # first short run alone pays the encoding and the difference overstates the rate).
        measure(tools["difftune_cached"](work / "runs" / "cache-warm-up", 1), work)
    if "difftune_cached_compiled" in tools:
        # Untimed: fills inductor's on-disk compile cache, so the timed short and long runs
        # both find compiled code (else only the first pays the compile).
        measure(tools["difftune_cached_compiled"](work / "runs" / "compile-warm-up", 10), work)
    runs: dict[str, dict[str, list[dict]]] = {name: {"short": [], "long": []} for name in tools}
    for repeat in range(args.repeats):
        for name, command in tools.items():  # alternating tools, so drift hits all alike
            for length, steps in (("short", args.short), ("long", args.long))[0 if args.short else 1 :]:
                out = work / "runs" / f"{name}-{length}-{repeat}"
                # The default run starts as a user's first run does: its own empty cache
                # folder (the caches it turns on are built inside the timed run).
                env = {"DIFFTUNE_CACHE": str(out / "home-cache")} if name == "difftune" else None
                result = {**measure(command(out, steps), work, gpu=args.gpu, env=env), "out": out}
                runs[name][length].append(result)
                memory = f", GPU {result['peak_gpu_mib']:6d} MiB" if args.gpu else ""
                print(f"{name:24s} {length:5s} #{repeat}: {result['seconds']:7.1f} s, "
                      f"peak RSS {result['peak_rss_mb']:7.0f} MB{memory}", flush=True)
    record = summarise(runs, args)
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


def apply_mode_defaults(args: argparse.Namespace) -> None:
    """Fill what was not given: the CPU comparison, or with --gpu the SD1.5 one."""
    defaults = ({"size": "sd15", "resolution": 512, "precision": "bf16", "batch": 16, "workers": 8,
                 "short": 0, "long": 110, "repeats": 1} if args.gpu
                else {"size": "test-x8", "resolution": 64, "precision": "no", "batch": 8, "workers": 0,
                      "short": 10, "long": 110, "repeats": 2})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.gpu and args.peak_tflops is None:
        args.peak_tflops = gpu_peak_tflops()


def gpu_peak_tflops() -> float:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    name = torch.cuda.get_device_name(0)
    for key, tflops in DENSE_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return tflops
    raise SystemExit(f"unknown GPU {name!r}: give its dense bf16 peak with --peak-tflops")


def steady_rate(out: Path, batch: int, first_step: int = 10) -> float:
    """Samples/s between step `first_step` and the last logged one, from the wall times of
    the loss scalars in the run's tensorboard files ("loss": diffusers, "train/loss":
    difftune, which logs every 10 steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for events in sorted(out.rglob("events.out.tfevents*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in ("loss", "train/loss"):
            if tag in accumulator.Tags()["scalars"]:
                points = [e for e in accumulator.Scalars(tag) if e.step >= first_step]
                if len(points) < 2 or points[-1].step == points[0].step:
                    raise SystemExit(f"{out}: too few logged steps after step {first_step} (use --long 30 or more)")
                first, last = points[0], points[-1]
                return (last.step - first.step) * batch / (last.wall_time - first.wall_time)
    raise SystemExit(f"{out}: no loss in its tensorboard files")


def _difftune(work: Path, base: Path, data: Path, out: Path, steps: int, args: argparse.Namespace,
              cache: Path | None, compile_: bool = False) -> list[str]:
    config = work / "configs" / f"{out.name}.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(difftune_config(base, data, out, steps, args, cache, compile_))
    return [args.python, "-m", "difftune", "train", str(config)]


def summarise(runs: dict, args: argparse.Namespace) -> dict:
    result = {}
    for name, lengths in runs.items():
        steady = [steady_rate(r["out"], args.batch) for r in lengths["long"]]
        if lengths["short"]:
            rates = [(args.long - args.short) * args.batch / (long["seconds"] - short["seconds"])
                     for short, long in zip(lengths["short"], lengths["long"])]
        else:
            rates = steady
        result[name] = {
            "samples_per_s": round(statistics.median(rates), 2),
            "samples_per_s_runs": [round(r, 2) for r in rates],
            "steady_samples_per_s_runs": [round(r, 2) for r in steady],
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in lengths["long"]), 1),
            "peak_pss_mb": round(max(r["peak_pss_mb"] for r in lengths["long"]), 1),
            "long_run_seconds": [round(r["seconds"], 1) for r in lengths["long"]],
        }
        if args.gpu:
            result[name]["peak_gpu_mib"] = max(r["peak_gpu_mib"] for r in lengths["long"])
            result[name]["gpu_memory_from"] = lengths["long"][0]["gpu_memory_from"]
            result[name]["mfu"] = round(result[name]["samples_per_s"] * STEP_TFLOP_PER_SAMPLE / args.peak_tflops, 3)
    base = result["diffusers"]
    for name, figures in result.items():
        if name != "diffusers":
            figures["speed_ratio_vs_diffusers"] = round(figures["samples_per_s"] / base["samples_per_s"], 2)
            # whole process: the long run's wall time, start-up and any cache building in it
            figures["whole_process_ratio_vs_diffusers"] = round(
                statistics.median(base["long_run_seconds"]) / statistics.median(figures["long_run_seconds"]), 2)
            figures["rss_ratio_vs_diffusers"] = round(figures["peak_rss_mb"] / base["peak_rss_mb"], 2)
            # with loader workers (GPU mode), PSS: RSS counts pages a worker shares with its parent again
            figures["pss_ratio_vs_diffusers"] = round(figures["peak_pss_mb"] / base["peak_pss_mb"], 2)
    settings = {name: getattr(args, name) for name in
                ("size", "batch", "resolution", "precision", "workers", "samples", "short", "long", "repeats")}
    machine = {"python": platform.python_version(), "cpus": psutil.cpu_count(), "platform": platform.platform()}
    if args.gpu:
        import torch

        machine["gpu"] = torch.cuda.get_device_name(0)
        machine["peak_bf16_tflops"] = args.peak_tflops
        machine["torch"] = torch.__version__
    return {"settings": settings, "machine": machine, "results": result}


if __name__ == "__main__":
    main()
