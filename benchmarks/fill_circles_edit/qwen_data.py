"""The fill-circles edit data at 128 pixels, for the Qwen-Image-Edit base (its VAE has factor
16: a 128-pixel target is 4x4 transformer tokens): 500 training rows, 64 held-out, 2 for
validation, under assets/fill-circles-edit-128/ (seeds 1, 2, 3).

    python benchmarks/fill_circles_edit/qwen_data.py [OUT]
"""

from __future__ import annotations

import sys
from pathlib import Path

from difftune.data.synthetic import write_fill_circles_edit

ROOT = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "assets" / "fill-circles-edit-128"
    for split, count, seed in (("train", 500, 1), ("held-out", 64, 2), ("validation", 2, 3)):
        write_fill_circles_edit(out / split, count, 128, seed=seed)
    print(out)
