"""Did DreamBooth teach the demo base a new word, and did the base keep its circles?

Loads the base with diffusers' StableDiffusionPipeline, once alone and once with the
run's LoRA (load_lora_weights), generates for every ordered pair of palette colours
"{fg} x with {bg} background" and "{fg} circle with {bg} background", and prints for
each: how square the shapes are (the shape's pixels over its bounding box: a filled
square is ~1.0, a disc ~0.8) and how often the shape has the prompted colour.

    python benchmarks/dreambooth_squares/check.py RUN_DIR [--base assets/fill-circles-base]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

from difftune.data.synthetic import DEMO_PALETTE
from difftune.metrics import standout_mask


def _fill_circles_check():
    """benchmarks/fill_circles/check.py, under a name that is not this file's."""
    path = Path(__file__).resolve().parents[1] / "fill_circles" / "check.py"
    spec = importlib.util.spec_from_file_location("fill_circles_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


nearest_palette_colour = _fill_circles_check().nearest_palette_colour

SQUARE = 0.86  # midway between the fill ratios of squares (0.95) and discs (0.77) after the base VAE


def fill_ratio(mask: np.ndarray) -> float | None:
    """Shape pixels over the area of their bounding box."""
    rows, columns = np.nonzero(mask)
    if len(rows) < 4:
        return None
    box = (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
    return float(mask.sum() / box)


def score(pipe: StableDiffusionPipeline, word: str, steps: int, guidance: float, seed: int) -> dict:
    pairs = list(itertools.permutations(DEMO_PALETTE, 2))
    prompts = [f"{fg} {word} with {bg} background" for fg, bg in pairs]
    images = []
    for start in range(0, len(prompts), 16):
        generator = torch.Generator().manual_seed(seed + start)
        images += pipe(prompts[start : start + 16], num_inference_steps=steps, guidance_scale=guidance,
                       height=32, width=32, generator=generator).images
    ratios, colour_hits, squares = [], 0, 0
    for image, (fg, _) in zip(images, pairs):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        mask = standout_mask(array)
        ratio = fill_ratio(mask)
        if ratio is None:
            continue
        ratios.append(ratio)
        squares += ratio > SQUARE
        colour_hits += nearest_palette_colour(array[mask]) == fg
    count = len(pairs)
    return {"prompts": count, "mean_fill_ratio": round(float(np.mean(ratios)), 3),
            "square_fraction": round(squares / count, 3), "colour_accuracy": round(colour_hits / count, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--base", default="assets/fill-circles-base")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    results = {}
    for name, lora in (("base", None), ("dreambooth", args.run_dir / "final")):
        pipe = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None, requires_safety_checker=False)
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            pipe.load_lora_weights(lora)
        results[name] = {word: score(pipe, word, args.steps, args.guidance, args.seed) for word in ("x", "circle")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
