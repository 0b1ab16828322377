"""Run the fill-circles ControlNet demo and print what it reached.

    python benchmarks/fill_circles/run.py [--family sd|sdxl] [--preset TOML] [--output-dir DIR] [--set KEY=VALUE ...]

Prints steps, wall time, samples/s, the final control and colour IoU with their floor
(as logged by validation), then the same scored apart from training with diffusers'
pipeline on all 64 held-out outlines (check.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {"sd": ROOT / "configs" / "demo" / "fill_circles_controlnet.toml",
           "sdxl": ROOT / "configs" / "demo" / "fill_circles_controlnet_sdxl.toml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "bench-fill-circles")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--family", choices=sorted(PRESETS), default="sd")
    parser.add_argument("--preset", type=Path, help="another fill-circles preset (a Control or Flux one)")
    args = parser.parse_args()
    output = args.output_dir.resolve()
    preset = args.preset.resolve() if args.preset else PRESETS[args.family]
    command = [sys.executable, "-m", "difftune", "train", str(preset),
               "--set", f'train.output_dir="{output}"', *sum((["--set", s] for s in args.set), [])]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    minutes = (time.perf_counter() - started) / 60
    events = [json.loads(line) for line in (output / "events.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    last = [e for e in events if e["event"] == "validation"][-1]
    import tomllib

    base = tomllib.loads(preset.read_text())["model"]["pretrained"]
    check = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fill_circles" / "check.py"), str(output),
                            "--base", base], check=True, cwd=ROOT, capture_output=True, text=True)
    summary = {
        "preset": str(preset.relative_to(ROOT)) if preset.is_relative_to(ROOT) else str(preset),
        "steps": steps[-1]["step"],
        "wall_minutes": round(minutes, 1),
        "samples_per_s": round(sum(e["samples_per_s"] for e in steps) / len(steps), 1),
        "validation_metrics": last["metrics"],
        "validation_floor": last.get("floor"),  # none where the result cannot be switched off
        "diffusers_check": json.loads(check.stdout),
    }
    print(json.dumps(summary, indent=2))
    (output / "benchmark.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
