"""Memory options measured, not assumed: 8-bit Adam and gradient checkpointing on an
SD1.5-shaped ControlNet (random weights, benchmarks/sd15.py), on the CPU.

Two measurements:

1. Optimizer state: the bytes AdamW (fused, fp32 states) and bitsandbytes' AdamW8bit
   keep for the ControlNet's 361M parameters, after one step, counted tensor by tensor.
2. Whole runs: `difftune train` for two steps (--batch, --resolution, fp32, latents and
   text cached) with each combination of train.use_8bit_adam and
   train.gradient_checkpointing; peak RSS of each. Two steps, because the optimizer
   state appears at the end of the first step: the second backward runs beside it.
   On the CPU, activations and states live in RAM, so the differences between the
   runs are what the options save; on a GPU the same bytes would be VRAM (the run's
   fixed part, the frozen models, differs).

    pip install bitsandbytes   # 0.50 runs AdamW8bit on the CPU
    python benchmarks/memory/run.py --work /tmp/memory --out result.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from measure import measure
from sd15 import build_sd15, sd15_unet

from difftune.config import build_config, to_toml
from difftune.data.synthetic import DEMO_PALETTE, write_fill_circles_parquet

WORDS = DEMO_PALETTE + ["circle", "with", "background"]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))


def optimizer_states() -> dict:
    """One step of each optimizer on the ControlNet, gradients random (no forward needed)."""
    import bitsandbytes
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(sd15_unet())
    parameters = [p for p in controlnet.parameters() if p.requires_grad]
    for p in parameters:
        p.grad = torch.randn_like(p) * 1e-3
    count = sum(p.numel() for p in parameters)
    result = {"parameters": count, "parameter_bytes_fp32": count * 4}
    for name, make in (("adamw", lambda: torch.optim.AdamW(parameters, lr=1e-5, fused=True)),
                       ("adamw8bit", lambda: bitsandbytes.optim.AdamW8bit(parameters, lr=1e-5))):
        optimizer = make()
        started = time.perf_counter()
        optimizer.step()
        result[name] = {"state_bytes": state_bytes(optimizer), "bytes_per_parameter": round(state_bytes(optimizer) / count, 3),
                        "step_seconds_cpu": round(time.perf_counter() - started, 2)}
        del optimizer
    return result


def config(base: Path, data: Path, out: Path, resolution: int, batch: int, cache: Path, eight_bit: bool,
           checkpointing: bool) -> str:
    """The run's config as TOML, validated before anything launches."""
    return to_toml(build_config({
        "model": {"pretrained": str(base)},
        "method": {"kind": "controlnet"},
        "data": {"path": str(data), "resolution": resolution, "cache_latents": True, "cache_text": True,
                 "encoded_cache_dir": str(cache)},
        "train": {"output_dir": str(out), "batch_size": batch, "max_steps": 2, "lr_warmup_steps": 0,
                  "checkpoint_every": 1_000_000, "report_to": "none", "use_8bit_adam": eight_bit,
                  "gradient_checkpointing": checkpointing},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--skip-states", action="store_true", help="only the whole runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    record: dict = {} if args.skip_states else {"optimizer_states": optimizer_states()}
    print(json.dumps(record, indent=2), flush=True)
    base = build_sd15(args.work / "base-sd15", WORDS)
    data = write_fill_circles_parquet(args.work / f"data-{args.resolution}", max(4, args.batch), args.resolution, seed=0,
                                      colours=DEMO_PALETTE)
    runs = {}
    for eight_bit, checkpointing in ((True, True), (True, False), (False, True), (False, False)):
        name = f"{'adamw8bit' if eight_bit else 'adamw'}{'+checkpointing' if checkpointing else ''}"
        toml = args.work / f"{name}.toml"
        toml.write_text(config(base, data, args.work / "runs" / f"{name}-{args.resolution}-{args.batch}",
                               args.resolution, args.batch, args.work / "cache", eight_bit, checkpointing))
        result = measure([sys.executable, "-m", "difftune", "train", str(toml)], args.work)
        runs[name] = {"seconds": round(result["seconds"], 1), "peak_rss_mb": round(result["peak_rss_mb"])}
        print(name, runs[name], flush=True)
    record["runs"] = {"resolution": args.resolution, "batch": args.batch, "precision": "fp32", **runs}
    record["machine"] = {"cpus": psutil.cpu_count(), "torch": torch.__version__}
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
