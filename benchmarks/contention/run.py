"""The demo's speed on a shared CPU: alone, and beside one busy process (a Python loop
on one core), for several thread settings. A run that slows in proportion to the cores
it lost keeps about half its speed on the 2-core box; the issue saw 30x.

    python benchmarks/contention/run.py [--seconds 40] [--out result.json]

Each case trains the built-in demo (`difftune demo`, validation off) for --seconds and
reports the samples/s of its logged steps after the first 10 (warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {  # name: (environment, --set overrides)
    "train.cpu_threads = \"auto\" (the default)": ({}, []),
    "train.cpu_threads = 2 (one per core, fixed: torch's default, difftune's before)": ({}, ["train.cpu_threads=2"]),
    "OMP_WAIT_POLICY=PASSIVE, 2 threads": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["train.cpu_threads=2"]),
}
SETTINGS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
BUSY = "while True: pass"


def samples_per_second(events: Path, batch: int) -> tuple[float, int]:
    steps = [json.loads(line) for line in events.read_text().splitlines() if '"event": "step"' in line]
    steps = [s for s in steps if s["step"] >= 10]
    if len(steps) < 2:
        return 0.0, len(steps)
    elapsed = steps[-1]["time"] - steps[0]["time"]
    return (steps[-1]["step"] - steps[0]["step"]) * batch / elapsed, steps[-1]["step"]


def run_case(env_extra: dict[str, str], sets: list[str], busy: bool, seconds: float, work: Path) -> dict:
    out = work / f"run-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS} | env_extra
    competitor = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        command = [sys.executable, "-m", "difftune", "demo", "--output-dir", str(out), "--set", "train.max_steps=100000",
                   "--set", "validation.every=1000000", "--set", "train.checkpoint_every=1000000",
                   "--set", "train.log_every=5", "--set", "train.report_to=none",
                   *[arg for item in sets for arg in ("--set", item)]]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(seconds)
        process.terminate()
        process.wait(timeout=120)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    rate, last = samples_per_second(out / "events.jsonl", batch=16)
    changes = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if '"threads"' in line]
    return {"samples_per_s": round(rate, 1), "steps": last,
            "thread_changes": [(c["step"], c["threads"]) for c in changes]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, (env, sets) in CASES.items():
            alone = run_case(env, sets, False, args.seconds, Path(scratch))
            shared = run_case(env, sets, True, args.seconds, Path(scratch))
            row = {"case": name, "alone": alone, "beside_a_busy_process": shared,
                   "kept": round(shared["samples_per_s"] / max(alone["samples_per_s"], 1e-9), 2)}
            print(json.dumps(row), flush=True)
            results.append(row)
    summary = {"cores": os.cpu_count(), "seconds_per_case": args.seconds, "busy_process": BUSY, "results": results}
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
