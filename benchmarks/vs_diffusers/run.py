"""difftune against diffusers' own examples/controlnet/train_controlnet.py, side by side.

Both train a ControlNet on the same tiny SD pipeline (built here, random weights) and the
same fill-circles data as one parquet file, with the same batch, resolution, learning
rate and steps, in the same Python, alternating runs. Neither validates; both save the
final ControlNet. Throughput is measured by difference, so start-up (imports, model
loading, dataset opening, a cache being built) cancels out:

    samples/s = (long - short steps) x batch / (wall time of long run - wall time of short run)

Peak RSS is the largest resident memory of the run's whole process tree (sampled every
20 ms), from the long runs.

train_controlnet.py needs torchvision, which does not import beside this box's CPU
torch 2.13, so run this from an environment with both:

    python -m venv /tmp/vbench
    /tmp/vbench/bin/pip install torch==2.14.1 torchvision==0.29.1 && /tmp/vbench/bin/pip install -e .
    /tmp/vbench/bin/python benchmarks/vs_diffusers/run.py --train-controlnet PATH/TO/diffusers/examples/controlnet/train_controlnet.py

It prints and writes (--out) a JSON record with both tools' samples/s and peak RSS, and
the ratios, for difftune as configured by default and with the latent and text cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from difftune.data.synthetic import DEMO_PALETTE, write_fill_circles_parquet
from difftune.tiny import build_tiny_sd

WORDS = DEMO_PALETTE + ["circle", "with", "background"]


def measure(command: list[str], cwd: Path) -> dict:
    """Wall time and peak RSS (process tree) of one command; fails loudly."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0}

    def sample() -> None:
        try:
            root = psutil.Process(process.pid)
            while process.poll() is None:
                tree = [root, *root.children(recursive=True)]
                rss = 0
                for member in tree:
                    try:
                        rss += member.memory_info().rss
                    except psutil.Error:
                        pass
                peak["rss"] = max(peak["rss"], rss)
                time.sleep(0.02)
        except psutil.Error:
            pass

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - started
    watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{output[-4000:]}")
    return {"seconds": seconds, "peak_rss_mb": peak["rss"] / 2**20}


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
        "--dataloader_num_workers", "0",
        "--report_to", "tensorboard",
    ]


def difftune_config(base: Path, data: Path, out: Path, steps: int, args: argparse.Namespace, cache: Path | None) -> str:
    caching = f'cache_latents = true\ncache_text = true\nencoded_cache_dir = "{cache}"\n' if cache else ""
    return f"""[model]
pretrained = "{base}"
[method]
kind = "controlnet"
[data]
path = "{data}"
resolution = {args.resolution}
{caching}[train]
output_dir = "{out}"
seed = 0
batch_size = {args.batch}
max_steps = {steps}
learning_rate = 1e-5
lr_warmup_steps = 0
checkpoint_every = 1000000
report_to = "tensorboard"
log_every = 10
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-controlnet", type=Path, required=True, help="diffusers' examples/controlnet/train_controlnet.py")
    parser.add_argument("--python", default=sys.executable, help="the interpreter both run in")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--size", choices=["test-x8"], default="test-x8",
                        help="tiny pipeline: diffusers' fast-test sizes with a VAE that downsamples x8 "
                             "(train_controlnet.py's ControlNet assumes SD's x8)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--samples", type=int, default=512, help="rows in the parquet dataset")
    parser.add_argument("--short", type=int, default=10, help="steps of the short runs")
    parser.add_argument("--long", type=int, default=110, help="steps of the long runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON record here too")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="vs-diffusers-"))
    work.mkdir(parents=True, exist_ok=True)
    base = build_tiny_sd(work / "base", WORDS, size=args.size, seed=0)
    data = write_fill_circles_parquet(work / "data", args.samples, args.resolution, seed=0, colours=DEMO_PALETTE)
    cache = work / "cache"
    tools = {
        "diffusers": lambda out, steps: diffusers_command(args.train_controlnet, base, data, out, steps, args),
        "difftune": lambda out, steps: _difftune(work, base, data, out, steps, args, None),
        "difftune_cached": lambda out, steps: _difftune(work, base, data, out, steps, args, cache),
    }
    runs: dict[str, dict[str, list[dict]]] = {name: {"short": [], "long": []} for name in tools}
    for repeat in range(args.repeats):
        for name, command in tools.items():  # alternating tools, so drift hits all alike
            for length, steps in (("short", args.short), ("long", args.long)):
                out = work / "runs" / f"{name}-{length}-{repeat}"
                result = measure(command(out, steps), work)
                runs[name][length].append(result)
                print(f"{name:16s} {length:5s} #{repeat}: {result['seconds']:7.1f} s, peak RSS {result['peak_rss_mb']:7.0f} MB",
                      flush=True)
    record = summarise(runs, args)
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


def _difftune(work: Path, base: Path, data: Path, out: Path, steps: int, args: argparse.Namespace,
              cache: Path | None) -> list[str]:
    config = work / "configs" / f"{out.name}.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(difftune_config(base, data, out, steps, args, cache))
    return [args.python, "-m", "difftune", "train", str(config)]


def summarise(runs: dict, args: argparse.Namespace) -> dict:
    steps = args.long - args.short
    result = {}
    for name, lengths in runs.items():
        rates = [steps * args.batch / (long["seconds"] - short["seconds"])
                 for short, long in zip(lengths["short"], lengths["long"])]
        result[name] = {
            "samples_per_s": round(statistics.median(rates), 2),
            "samples_per_s_runs": [round(r, 2) for r in rates],
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in lengths["long"]), 1),
            "long_run_seconds": [round(r["seconds"], 1) for r in lengths["long"]],
        }
    base = result["diffusers"]
    for name in ("difftune", "difftune_cached"):
        result[name]["speed_ratio_vs_diffusers"] = round(result[name]["samples_per_s"] / base["samples_per_s"], 2)
        result[name]["rss_ratio_vs_diffusers"] = round(result[name]["peak_rss_mb"] / base["peak_rss_mb"], 2)
    return {
        "settings": {"size": args.size, "batch": args.batch, "resolution": args.resolution, "samples": args.samples,
                     "short_steps": args.short, "long_steps": args.long, "repeats": args.repeats},
        "machine": {"python": platform.python_version(), "cpus": psutil.cpu_count(), "platform": platform.platform()},
        "results": result,
    }


if __name__ == "__main__":
    main()
