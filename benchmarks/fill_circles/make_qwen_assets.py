"""The Qwen-Image fill-circles assets, for the Qwen-Image ControlNet preset:

- assets/fill-circles-base-qwen: a Qwen-Image-Edit fill-circles base of VAE factor 16 (train_qwen_base.py's
  "bench" size; what assets/fill-circles-base-qwen-edit was before the factor-64 "megapixel" base,
  in git history) as a QwenImagePipeline folder (its transformer was trained text-to-image with
  QwenImagePipeline's prompt, see benchmarks/fill_circles_edit/train_qwen_base.py; the edit
  pipeline's processor is left out). No weight changes, so git stores the weights once;
- assets/fill-circles-128: fill-circles at 128 pixels (the base's VAE has factor 16: 4x4
  transformer tokens), 2000 training rows, 64 held-out, 2 validation outlines, the outlines
  8 pixels wide (half a VAE cell: this VAE, trained on discs, loses the default 2-pixel line).

    python benchmarks/fill_circles/make_qwen_assets.py EDIT_BASE_OF_FACTOR_16
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

from difftune.data.synthetic import DEMO_PALETTE, draw_conditioning, random_circle, write_fill_circles_parquet

ROOT = Path(__file__).resolve().parents[2]
RESOLUTION = 128
OUTLINE = 8


def make_qwen_base(edit_base: Path, out: Path) -> Path:
    assert edit_base.resolve() != out.resolve(), "give the edit base, not the folder written"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(edit_base, out, ignore=shutil.ignore_patterns("processor"))
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "QwenImagePipeline"
    index.pop("processor")
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def make_data(out: Path) -> Path:
    write_fill_circles_parquet(out / "train", 2000, RESOLUTION, seed=0, colours=DEMO_PALETTE, outline_width=OUTLINE)
    write_fill_circles_parquet(out / "held-out", 64, RESOLUTION, seed=1, colours=DEMO_PALETTE, outline_width=OUTLINE)
    rng = random.Random(2)
    (out / "validation").mkdir(parents=True, exist_ok=True)
    for index in range(2):
        draw_conditioning(random_circle(rng, RESOLUTION, DEMO_PALETTE), RESOLUTION, OUTLINE).save(
            out / "validation" / f"{index}.png")
    return out


if __name__ == "__main__":
    print(make_qwen_base(Path(sys.argv[1]), ROOT / "assets" / "fill-circles-base-qwen"))
    print(make_data(ROOT / "assets" / "fill-circles-128"))
