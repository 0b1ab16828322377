"""Score a trained fill-circles ControlNet with diffusers' own pipeline, apart from training.

Loads the base family's ControlNet pipeline (StableDiffusionControlNetPipeline, or
StableDiffusionXLControlNetPipeline for an SDXL base, as its model_index.json says)
from the base and RUN/final, generates for every
held-out outline with its caption, once with the ControlNet (scale 1) and once without
(scale 0, the floor), and prints for both the mean control and colour IoU and how often
the disc and the background have the prompted palette colour.

    python benchmarks/fill_circles/check.py RUN_DIR [--base assets/fill-circles-base]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets
import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UniPCMultistepScheduler,
)
from PIL import ImageColor

from difftune.data.synthetic import DEMO_PALETTE
from difftune.metrics import CAPTION, FillCirclesIoU, mean_scores, standout_mask


def nearest_palette_colour(pixels: np.ndarray) -> str:
    """The palette name nearest the median colour of some pixels (N x 3, in [0, 1])."""
    median = np.median(pixels, axis=0)
    rgb = {name: np.array(ImageColor.getrgb(name), dtype=np.float32) / 255 for name in DEMO_PALETTE}
    return min(rgb, key=lambda name: float(np.linalg.norm(rgb[name] - median)))


def colour_accuracy(images: list, captions: list[str]) -> dict[str, float]:
    """How often the disc and the background have the prompted colours (nearest palette
    colour of the disc's and the rest's median), the base model's text conditioning check."""
    disc_hits, background_hits = 0, 0
    for image, caption in zip(images, captions):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        disc = standout_mask(array)
        match = CAPTION.match(caption)
        if disc.any():
            disc_hits += nearest_palette_colour(array[disc]) == match["fg"]
        background_hits += nearest_palette_colour(array[~disc]) == match["bg"]
    return {"disc_colour_accuracy": disc_hits / len(images), "background_colour_accuracy": background_hits / len(images)}


# diffusers' ControlNet pipeline for each base pipeline class, with what it is built with.
CONTROLNET_PIPELINES = {
    "StableDiffusionPipeline": (StableDiffusionControlNetPipeline,
                                {"safety_checker": None, "requires_safety_checker": False}),
    "StableDiffusionXLPipeline": (StableDiffusionXLControlNetPipeline, {"add_watermarker": False}),
}


def controlnet_pipeline(base: str, controlnet: ControlNetModel):
    base_class = json.loads((Path(base) / "model_index.json").read_text())["_class_name"]
    cls, options = CONTROLNET_PIPELINES[base_class]
    return cls.from_pretrained(base, controlnet=controlnet, **options)


def evaluate(base: str, controlnet_dir: Path, held_out: str, steps: int, guidance: float, seed: int) -> dict:
    rows = datasets.load_dataset(held_out, split="train")
    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    pipe = controlnet_pipeline(base, controlnet)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    metric = FillCirclesIoU()
    results = {}
    for label, scale in (("controlnet", 1.0), ("floor", 0.0)):
        images = pipe(
            list(rows["text"]),
            image=[image.convert("RGB") for image in rows["conditioning_image"]],
            num_inference_steps=steps,
            guidance_scale=guidance,
            controlnet_conditioning_scale=scale,
            generator=torch.Generator().manual_seed(seed),
        ).images
        scores = [metric.score(g, c, t) for g, c, t in zip(images, rows["conditioning_image"], rows["text"])]
        results[label] = mean_scores(scores) | colour_accuracy(images, list(rows["text"]))
    results["samples"] = len(rows)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--base", default="assets/fill-circles-base")
    parser.add_argument("--held-out", default="assets/fill-circles/held-out")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    results = evaluate(args.base, args.run_dir / "final", args.held_out, args.steps, args.guidance_scale, args.seed)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
