"""Bytes per parameter of frozen models as difftune's model.quantize holds them: every
nn.Linear in NF4 or int8 (bitsandbytes) or fp8 (torchao), convolutions and norms as they
are. Random weights: an SD1.5-shaped UNet and CLIP text encoder at full size (benchmarks/sd15.py),
and FLUX.1's transformer at full width, built with one block of each kind and scaled to
its 19 + 38 blocks.

    python benchmarks/memory/quantized.py [--out result.json]

Counts the bytes of every parameter (4-bit weights are packed two to a byte) and the
quantization scales, over the parameters the full-precision model has.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))
from sd15 import sd15_text_encoder, sd15_unet

from difftune.quantization import bytes_per_parameter, parameter_bytes, quantize_frozen_linears


def measure(build, kind: str | None) -> dict:
    torch.manual_seed(0)
    module = build().requires_grad_(False).eval()
    parameters = sum(p.numel() for p in module.parameters())
    linear = sum(p.numel() for m in module.modules() if type(m) is torch.nn.Linear for p in m.parameters())
    started = time.perf_counter()
    layers = quantize_frozen_linears(module, kind, torch.float32) if kind else 0
    return {"quantize": kind or "none (fp32)", "parameters_m": round(parameters / 1e6, 1),
            "in_linear_layers": round(linear / parameters, 3), "layers_quantized": layers,
            "bytes_per_parameter": round(bytes_per_parameter(module), 3),
            "total_mb": round(bytes_per_parameter(module) * parameters / 2**20, 1),
            "seconds_to_quantize": round(time.perf_counter() - started, 1)}


def flux_blocks():
    """FLUX.1's transformer at full width with one dual-stream and one single-stream block
    (the real one has 19 and 38): rows for it are scaled per block."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True)


def flux_scaled(kind: str | None) -> dict:
    """Bytes of FLUX.1's 19 + 38 blocks and the rest, from one block of each."""
    torch.manual_seed(0)
    module = flux_blocks().requires_grad_(False).eval()
    if kind:
        quantize_frozen_linears(module, kind, torch.float32)

    def size(part: torch.nn.Module) -> tuple[int, float]:
        sizes = [parameter_bytes(p) for p in part.parameters()]
        return sum(count for count, _ in sizes), sum(stored for _, stored in sizes)

    double, single = size(module.transformer_blocks[0]), size(module.single_transformer_blocks[0])
    whole = size(module)
    rest = (whole[0] - double[0] - single[0], whole[1] - double[1] - single[1])
    parameters = rest[0] + 19 * double[0] + 38 * single[0]
    stored = rest[1] + 19 * double[1] + 38 * single[1]
    return {"model": "FLUX.1 transformer (19 + 38 blocks, scaled from one of each)", "quantize": kind or "none (fp32)",
            "parameters_m": round(parameters / 1e6, 1), "bytes_per_parameter": round(stored / parameters, 3),
            "total_mb": round(stored / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name, build in (("SD1.5 UNet", sd15_unet), ("SD1.5 CLIP text encoder", lambda: sd15_text_encoder(49408))):
        for kind in (None, "int8", "nf4", "fp8"):
            row = {"model": name, **measure(build, kind)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    for kind in (None, "int8", "nf4", "fp8"):
        row = flux_scaled(kind)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"device": "cpu", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
