"""Peak memory per rank of a sharded full fine-tune (FSDP2) against DDP, on the CPU.

A full fine-tune of a half-width SD1.5 UNet (block channels 160/320/640/640, 220M
parameters, random weights; the SD1.5 VAE and text encoder, cached) for three steps,
2 processes over gloo:
- one process alone (for reference);
- DDP: `torchrun --nproc_per_node 2` (every rank holds the whole weights, gradients and
  AdamW's two moments, and DDP's gradient buckets);
- FSDP2: `accelerate launch --config_file configs/accelerate/fsdp2.yaml` (each rank holds
  half of them, and one block's whole weights while it computes).

Per rank: the main process's peak resident memory (its `peak_memory_mb` in events.jsonl,
getrusage's high-water mark), and the launch's whole process tree (benchmarks/measure.py).
On the CPU the weights, gradients and optimizer states live in RAM, so what sharding
saves shows there as it would in GPU memory.

    python benchmarks/scale_out/memory.py --work /tmp/scale-out --out result.json [--method controlnet]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psutil
import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).parent.parent))
from measure import measure
from sd15 import sd15_text_encoder, sd15_vae

from difftune.config import build_config, to_toml
from difftune.data.synthetic import DEMO_PALETTE, write_fill_circles
from difftune.families.sd.tiny import save_random_sd

ROOT = Path(__file__).resolve().parents[2]
WORDS = DEMO_PALETTE + ["circle", "with", "background"]


def half_sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(160, 320, 640, 640), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    )


def config(base: Path, data: Path, out: Path, batch: int, cache: Path, method: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.toml"
    path.write_text(to_toml(build_config({
        "model": {"pretrained": str(base)},
        "method": {"kind": method},
        "data": {"path": str(data), "resolution": 64, "cache_latents": True, "cache_text": True,
                 "encoded_cache_dir": str(cache)},
        "train": {"output_dir": str(out), "batch_size": batch, "max_steps": 3, "lr_warmup_steps": 0,
                  "checkpoint_every": 1_000_000, "report_to": "none", "log_every": 1},
    })))
    return path


def main_rank_peak(run: Path) -> float:
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return max(e["peak_memory_mb"] for e in events if e["event"] == "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--method", choices=["full", "controlnet"], default="full",
                        help="controlnet: the frozen UNet is sharded too under FSDP2")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base = args.work / "base"
    if not (base / "model_index.json").is_file():
        save_random_sd(base, WORDS, 0, 77, vae=sd15_vae, text_encoder=sd15_text_encoder, unet=half_sd15_unet)
    data = write_fill_circles(args.work / "data", 8, 64, seed=0, colours=DEMO_PALETTE)
    parameters = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(base, subfolder="unet").parameters())
    python = sys.executable
    launches = {
        "one_process": (1, [python, "-m", "difftune", "train"], 2),
        "ddp": (2, [python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "difftune", "train"], 1),
        "fsdp2": (2, [python, "-m", "accelerate.commands.launch", "--config_file",
                      str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "-m", "difftune", "train"], 1),
    }
    runs = {}
    for name, (processes, command, batch) in launches.items():
        out = args.work / "runs" / f"{args.method}-{name}"
        toml = config(base, data, out, batch, args.work / "cache", args.method)
        result = measure([*command, str(toml)], args.work)
        runs[name] = {"processes": processes, "batch_per_process": batch,
                      "main_rank_peak_rss_mb": round(main_rank_peak(out)),
                      "tree_peak_rss_mb": round(result["peak_rss_mb"]), "seconds": round(result["seconds"], 1)}
        print(name, runs[name], flush=True)
    what = "full fine-tune" if args.method == "full" else "ControlNet from it (the UNet frozen)"
    record = {"model": f"half-width SD1.5 UNet, {what}, fp32, AdamW", "unet_parameters": parameters,
              "weights_mb_fp32": round(parameters * 4 / 2**20), "runs": runs,
              "fsdp2_over_ddp_main_rank": round(runs["fsdp2"]["main_rank_peak_rss_mb"] / runs["ddp"]["main_rank_peak_rss_mb"], 3),
              "machine": {"cpus": psutil.cpu_count(), "torch": torch.__version__}}
    print(json.dumps(record, indent=2))
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
