"""Score a trained fill-circles control model with diffusers' own pipeline, apart from training.

Loads the pipeline that runs RUN/final for the base's family (its model_index.json says
which): a ControlNet into StableDiffusion(XL)ControlNetPipeline, FluxControlNetPipeline or
StableDiffusion3ControlNetPipeline (the family's load_controlnet and "controlnet" pipeline);
a Control model as a FluxControlPipeline; a Control-LoRA into the base's
FluxControlPipeline. It generates for every held-out outline with its caption, once with
the result on and once off (ControlNet scale 0, LoRA scale 0, or the base's text-to-image
pipeline: the floor), and prints for both the mean control and colour IoU and how often
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
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from PIL import ImageColor

from difftune.data.synthetic import DEMO_PALETTE
from difftune.families import family_of_pipeline
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


def run_kind(run_dir: Path) -> tuple[str, bool]:
    """The run's method kind, and whether it trained LoRA adapters (its config.toml)."""
    import tomllib

    method = tomllib.loads((run_dir / "config.toml").read_text()).get("method", {})
    return method.get("kind", "controlnet"), "lora" in method


def pipelines(base: str, run_dir: Path) -> tuple[object, dict, dict, object]:
    """diffusers' pipeline for the run's result, the call arguments that turn the result
    on and off (the floor), and a separate floor pipeline where the result cannot be
    switched off (a whole Control model: the base's text-to-image pipeline)."""
    import diffusers

    family = family_of_pipeline(Path(base))
    kind, lora = run_kind(run_dir)
    final = run_dir / "final"
    options = family.pipeline_options
    if kind == "controlnet":
        controlnet = family.load_controlnet(str(final), torch.float32)
        pipe = family.pipeline_class("controlnet").from_pretrained(base, controlnet=controlnet, **options)
        return pipe, {"controlnet_conditioning_scale": 1.0}, {"controlnet_conditioning_scale": 0.0}, None
    control = getattr(diffusers, family.pipeline_classes["control"])
    if lora:  # Control-LoRA on the base; scale 0 leaves the base (its widened inputs are zeros)
        pipe = control.from_pretrained(base, **options)
        pipe.load_lora_weights(final)
        key = family.attention_options
        return pipe, {key: {"scale": 1.0}}, {key: {"scale": 0.0}}, None
    floor = family.pipeline_class("text_to_image").from_pretrained(base, **options)
    return control.from_pretrained(final, **options), {}, {}, floor


# Qwen-Image's pipelines give other images for a row in another batch (0.285 against 0.349
# control IoU on the same 8 rows in a batch of 8 and of 16): scored in validation's chunks.
CHUNK = 16


def evaluate(base: str, run_dir: Path, held_out: str, steps: int, guidance: float, seed: int) -> dict:
    rows = datasets.load_dataset(held_out, split="train")
    family = family_of_pipeline(Path(base))
    pipe, on, off, floor = pipelines(base, run_dir)
    metric = FillCirclesIoU()
    controls = [image.convert("RGB") for image in rows["conditioning_image"]]
    results = {}
    for label, runner, settings in (("controlnet", pipe, on), ("floor", floor or pipe, off)):
        if not isinstance(runner.scheduler, FlowMatchEulerDiscreteScheduler):  # flow matching keeps its own
            runner.scheduler = UniPCMultistepScheduler.from_config(runner.scheduler.config)
        runner.set_progress_bar_config(disable=True)
        width, height = controls[0].size  # the held-out size (Flux's pipelines default to 1024-ish)
        images = []
        for start in range(0, len(controls), CHUNK):  # as validation's metric calls the pipeline
            texts, chunk = list(rows["text"])[start:start + CHUNK], controls[start:start + CHUNK]
            call = family.control_arguments(chunk) if runner is pipe else {}
            images += runner(
                texts, **call, num_inference_steps=steps, height=height, width=width,
                generator=torch.Generator().manual_seed(seed + start), **family.generation_options(runner),
                **family.guidance_arguments(runner, guidance, len(texts)), **settings,
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
    results = evaluate(args.base, args.run_dir, args.held_out, args.steps, args.guidance_scale, args.seed)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
