"""Peak memory of a training step per family, method and `model.quantize`, at real widths.

Each row is one difftune `Run` in its own process (random weights, bf16 mixed precision
as on a GPU, batch 1, both caches on, two steps: the optimizer state appears at the end
of the first, so the second backward runs beside it). Measured in that process:

- frozen: the denoiser's frozen weights as the run holds them (bf16, or NF4 / int8 in its
  linear layers), bytes per parameter counted tensor by tensor;
- trained: the weights the method trains (fp32), their gradients and the optimizer's
  state, counted the same way after the steps;
- step: the rise of the process's peak resident memory over what it held before the
  first step (gradients, optimizer state, activations, temporaries); the peak is reset
  through /proc/self/clear_refs, so only the steps count;
- device estimate = frozen + trained weights + step: what the step needs on an
  accelerator. The text encoders and VAE are not in it: with the caches they are used
  before training and then leave the device (on the CPU they stay in RAM, below the
  baseline).

Shapes: SD1.5 whole (benchmarks/sd15.py). SDXL and FLUX.1 at full width but fewer blocks
(benchmarks/shapes.py), each measured at two depths and every figure extrapolated
linearly to the real depth (SDXL: 10 transformer layers at the deepest level; FLUX.1:
19 + 38 blocks): weights, gradients, optimizer state and stored activations all grow by
the same amount per block. `--check-full` adds SDXL's LoRA row at its real depth (2.6B
parameters; fits this machine), to check the extrapolation against a measurement.

    pip install bitsandbytes   # 0.50 quantizes and runs on the CPU
    python benchmarks/memory/methods.py --work /tmp/memory-methods --out result.json \
        [--shapes sd15 sdxl flux] [--resolution 512] [--check-full]

On the CPU, activations of a bf16 step are not byte for byte those of a GPU (other
attention kernels), so the step column is an estimate of a GPU's; the weight columns are
exact.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent.parent))
from sd15 import build_sd15
from shapes import FLUX_DEPTH, SDXL_DEPTH, build_flux, build_sdxl

from difftune.data.synthetic import DEMO_PALETTE, write_fill_circles_parquet

WORDS = DEMO_PALETTE + ["circle", "with", "background"]
MB = 2**20

SHAPES = {
    # name: (builder taking (folder, depth) or None for whole, depths measured, real depth, methods)
    "sd15": (None, [None], None, ["lora", "controlnet"]),
    "sdxl": (build_sdxl, [2, 4], SDXL_DEPTH, ["lora", "controlnet"]),
    "flux": (build_flux, [1, 2], FLUX_DEPTH, ["lora", "control_lora"]),
}


def method_section(method: str) -> dict:
    lora = {"rank": 16}
    return {"lora": {"kind": "lora", "lora": lora}, "controlnet": {"kind": "controlnet"},
            "control_lora": {"kind": "control", "lora": lora}, "full": {"kind": "full"}}[method]


# --- one row, in its own process --------------------------------------------------------


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def stored_bytes(parameters) -> tuple[int, int]:
    """(parameters they stand for, bytes stored), quantization scales included."""
    from difftune.quantization import parameter_bytes

    sizes = [parameter_bytes(p) for p in parameters]
    return sum(count for count, _ in sizes), sum(size for _, size in sizes)


def one_row(row: dict) -> dict:
    import torch

    from difftune.config import build_config
    from difftune.training.events import return_freed_memory
    from difftune.training.loop import Run

    config = build_config({
        "model": {"family": row["family"], "pretrained": row["pipeline"], "quantize": row["quantize"]},
        "method": method_section(row["method"]),
        "data": {"path": row["data"], "resolution": row["resolution"], "cache_latents": True, "cache_text": True,
                 "encoded_cache_dir": row["cache"]},
        "train": {"output_dir": row["out"], "seed": 0, "batch_size": 1, "max_steps": 2, "lr_warmup_steps": 0,
                  "mixed_precision": "bf16", "checkpoint_every": 1_000_000, "log_every": 1, "report_to": "none",
                  "gradient_checkpointing": row.get("checkpointing", False)},
    })
    run = Run(config)
    run._finish = lambda state: None  # the steps only: no final/ (its save would be the peak)
    return_freed_memory()  # loading's freed copies leave the resident size, so the steps cannot reuse them unseen
    baseline = psutil.Process().memory_info().rss
    reset_peak_rss()
    started = time.perf_counter()
    run.fit()
    seconds = time.perf_counter() - started
    step = peak_rss() - baseline
    denoiser = run.trainee.parts.denoiser
    frozen = stored_bytes(p for p in denoiser.parameters() if not p.requires_grad)
    trained_params = [p for m in run.trainee.trained.values() for p in m.parameters() if p.requires_grad]
    trained = stored_bytes(trained_params)
    optimizer = getattr(run.optimizer, "optimizer", run.optimizer)
    states = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t))
    return {
        "frozen_params": frozen[0], "frozen_bytes": frozen[1],
        "trained_params": trained[0], "trained_bytes": trained[1],
        "gradient_bytes": trained[1],  # fp32, one per trained weight (set to None after the step)
        "optimizer_state_bytes": states,
        "step_peak_bytes": step,
        "device_estimate_bytes": frozen[1] + trained[1] + step,
        "seconds": round(seconds, 1),
    }


# --- the table --------------------------------------------------------------------------

FIGURES = ("frozen_params", "frozen_bytes", "trained_params", "trained_bytes", "gradient_bytes",
           "optimizer_state_bytes", "step_peak_bytes", "device_estimate_bytes")


def extrapolate(low: dict, high: dict, depths: list[int], real: int) -> dict:
    """Each figure linear in depth, through the two measured depths, at the real depth."""
    d1, d2 = depths
    return {k: round(low[k] + (high[k] - low[k]) / (d2 - d1) * (real - d1)) for k in FIGURES}


def summary(figures: dict) -> dict:
    frozen, trained = max(figures["frozen_params"], 1), max(figures["trained_params"], 1)
    return {
        "frozen_params_m": round(figures["frozen_params"] / 1e6, 1),
        "frozen_bytes_per_param": round(figures["frozen_bytes"] / frozen, 3),
        "trained_params_m": round(figures["trained_params"] / 1e6, 2),
        "trained_bytes_per_param": round((figures["trained_bytes"] + figures["gradient_bytes"]
                                          + figures["optimizer_state_bytes"]) / trained, 2),
        "step_peak_mb": round(figures["step_peak_bytes"] / MB),
        "device_estimate_mb": round(figures["device_estimate_bytes"] / MB),
    }


def run_row(row: dict) -> dict:
    # A fixed mmap threshold: glibc then maps every block over 128 kB on its own and
    # unmaps it when freed, so the resident size follows what is alive (by default the
    # threshold grows to 32 MB and freed tensors stay in the heap, resident, where a later
    # allocation reuses them without the peak rising: SDXL's LoRA step read ~100 MB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, __file__, "--row", json.dumps(row)], capture_output=True, text=True,
                         check=False, env=env)
    if out.returncode != 0:
        raise SystemExit(f"row {row} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/memory-methods"))
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods")
    parser.add_argument("--quantize", nargs="+", default=["none", "int8", "nf4"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="every row with train.gradient_checkpointing = true")
    parser.add_argument("--check-full", action="store_true", help="also SDXL LoRA at its real depth")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(one_row(json.loads(args.row))))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    data = write_fill_circles_parquet(args.work / f"data-{args.resolution}", 4, args.resolution, seed=0,
                                      colours=DEMO_PALETTE)
    quantize = [None if q == "none" else q for q in args.quantize]
    suffix = "-gc" if args.gradient_checkpointing else ""
    rows = []
    for shape in args.shapes:
        build, depths, real, methods = SHAPES[shape]
        pipelines = {d: (build(args.work / f"{shape}-{d}", WORDS, d) if build else build_sd15(args.work / shape, WORDS))
                     for d in depths}
        for method in args.methods or methods:
            if method not in methods:
                continue
            for kind in quantize:
                measured = {}
                for depth, pipeline in pipelines.items():
                    row = {"family": "sd" if shape == "sd15" else shape, "pipeline": str(pipeline), "data": str(data), "resolution": args.resolution,
                           "method": method, "quantize": kind, "cache": str(args.work / "cache"),
                           "checkpointing": args.gradient_checkpointing,
                           "out": str(args.work / "runs" / f"{shape}-{depth}-{method}-{kind}-{args.resolution}{suffix}")}
                    measured[depth] = run_row(row)
                    print(shape, depth, method, kind, json.dumps(summary(measured[depth])), flush=True)
                figures = measured[None] if real is None else extrapolate(measured[depths[0]], measured[depths[1]],
                                                                          depths, real)
                rows.append({"shape": shape, "depth": real, "measured_at_depths": depths, "method": method,
                             "quantize": kind or "none", "gradient_checkpointing": args.gradient_checkpointing,
                             **summary(figures), "figures": figures,
                             "measured": {str(d): m for d, m in measured.items()}})
                print("=>", json.dumps({k: v for k, v in rows[-1].items() if k not in ("figures", "measured")}),
                      flush=True)
    if args.check_full:
        pipeline = build_sdxl(args.work / f"sdxl-{SDXL_DEPTH}", WORDS, SDXL_DEPTH)
        row = {"family": "sdxl", "pipeline": str(pipeline), "data": str(data), "resolution": args.resolution,
               "method": "lora",
               "quantize": None, "cache": str(args.work / "cache"), "out": str(args.work / "runs" / "sdxl-full-lora")}
        figures = run_row(row)
        rows.append({"shape": "sdxl", "depth": SDXL_DEPTH, "measured_at_depths": [SDXL_DEPTH], "method": "lora",
                     "quantize": "none", **summary(figures), "figures": figures})
        print("full depth =>", json.dumps(summary(figures)), flush=True)
    record = {"resolution": args.resolution, "batch": 1, "precision": "bf16", "steps": 2,
              "gradient_checkpointing": args.gradient_checkpointing, "rows": rows,
              "machine": {"cpus": psutil.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30)}}
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
