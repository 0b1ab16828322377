"""CPU training speed and peak memory with glibc keeping freed memory (train.keep_freed_memory,
difftune/heap.py) and without it, on the same configs, steps and data.

    python benchmarks/heap/run.py [--out result.json] [--only NAME]

Each case trains its config for a fixed number of steps (validation and checkpoints off,
caches as the config chooses, so run each config once beforehand to fill its cache) and
reports the samples/s of its logged steps after the first quarter (warm-up), the losses
(the two settings must agree: only where memory comes from changes) and the peak RSS.
Run it alone on the machine: a second busy process changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from measure import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CASES = {  # name: (config or "demo", steps, batch size)
    "demo (SD, 32 px)": ("demo", 150, 16),
    "fill-circles edit, Qwen-Image-Edit (megapixel references)": ("configs/demo/fill_circles_edit_qwen.toml", 200, 16),
    "LCM-LoRA distillation, fill-circles SD": ("configs/demo/distill_lcm_fill_circles.toml", 60, 64),
}


def train_command(config: str, steps: int, out: Path, keep: bool) -> list[str]:
    verb = ["demo", "--output-dir", str(out)] if config == "demo" else ["train", config]
    sets = {"train.output_dir": str(out), "train.max_steps": steps, "validation.every": 10**6,
            "train.checkpoint_every": 10**6, "train.log_every": 5, "train.report_to": "none",
            "train.keep_freed_memory": str(keep).lower()}
    if config == "demo":
        del sets["train.output_dir"]
    return [sys.executable, "-m", "difftune", *verb, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


def logged_steps(events: Path) -> list[dict]:
    return [json.loads(line) for line in events.read_text().splitlines() if '"event": "step"' in line]


def rate(steps: list[dict], batch: int) -> float:
    warm = [s for s in steps if s["step"] > steps[-1]["step"] // 4]
    return (warm[-1]["step"] - warm[0]["step"]) * batch / (warm[-1]["time"] - warm[0]["time"])


def run_case(config: str, steps: int, batch: int, keep: bool, work: Path) -> dict:
    out = work / f"{'kept' if keep else 'system'}-{abs(hash(config))}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))  # fixed: no thread governor changes mid-run
    measured = measure_with(train_command(config, steps, out, keep), env)
    logged = logged_steps(out / "events.jsonl")
    return {"samples_per_s": round(rate(logged, batch), 1), "losses": [s["loss"] for s in logged][-3:],
            "peak_rss_mb": round(measured["peak_rss_mb"]), "seconds": round(measured["seconds"], 1)}


def measure_with(command: list[str], env: dict[str, str]) -> dict:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return measure(command, ROOT)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--only", help="run the cases whose name contains this")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (config, steps, batch) in CASES.items():
            if args.only and args.only not in name:
                continue
            system = run_case(config, steps, batch, False, Path(scratch))
            kept = run_case(config, steps, batch, True, Path(scratch))
            row = {"case": name, "config": config, "steps": steps, "system_malloc": system, "kept": kept,
                   "speedup": round(kept["samples_per_s"] / system["samples_per_s"], 2),
                   "same_losses": kept["losses"] == system["losses"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    summary = {"cores": os.cpu_count(), "python": sys.version.split()[0], "results": rows}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
