"""Validation: fixed prompts and conditioning images -> PNGs, one grid per pair, tracker images."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from difftune.config import RunConfig, ValidationConfig
from difftune.data.images import open_oriented
from difftune.data.sources import DataError
from difftune.families.base import Family, Parts
from difftune.methods.base import Method, Trained, evaluating


@dataclass(frozen=True)
class ValidationPair:
    prompt: str
    image_path: str | list[str] | None
    image: Image.Image | list[Image.Image] | None
    """The conditioning image, or an edit prompt's several references (a list)."""

    @property
    def shown(self) -> list[Image.Image]:
        """The images the grid shows before the generated ones."""
        return [] if self.image is None else self.image if isinstance(self.image, list) else [self.image]


def open_validation_image(path: str, where: str, resolution: int | None) -> Image.Image:
    """Upright (EXIF orientation), as training saw its conditioning images; resized to the
    square resolution (a conditioning image), or kept at its size (None: an edit's reference)."""
    try:
        image = open_oriented(Path(path))
        return image if resolution is None else image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    except FileNotFoundError:
        raise DataError(f"{where}: no such file {path}") from None
    except Exception as error:
        raise DataError(f"{where}: unreadable image {path} ({error})") from None


def load_validation_pairs(config: ValidationConfig, resolution: int | None) -> list[ValidationPair]:
    """Open every validation image now, so a bad path fails before any model loads
    (resolution None: each kept at its own size)."""
    pairs = []
    for index, (prompt, path) in enumerate(config.pairs()):
        if path is None:
            pairs.append(ValidationPair(prompt, None, None))
        elif isinstance(path, list):  # an edit prompt's several references
            images = [open_validation_image(one, f"validation.images[{index}][{number}]", resolution)
                      for number, one in enumerate(path)]
            pairs.append(ValidationPair(prompt, path, images))
        else:
            pairs.append(ValidationPair(prompt, path, open_validation_image(path, f"validation.images[{index}]",
                                                                            resolution)))
    return pairs


def one_size(images: list[Image.Image], size: tuple[int, int] | None = None) -> list[Image.Image]:
    """The images at `size` (default: the largest's, so an edit's reference, kept at its own
    size, is shown at its edit's): a grid's cells, a tracker's stack."""
    size = size or (max(image.width for image in images), max(image.height for image in images))
    return [image if image.size == size else image.resize(size) for image in images]


def grid(images: list[Image.Image], size: tuple[int, int] | None = None) -> Image.Image:
    """Images side by side, left to right, each at `size` (default: the largest's)."""
    cells = one_size(images, size)
    width, height = cells[0].size
    canvas = Image.new("RGB", (width * len(cells), height))
    for column, image in enumerate(cells):
        canvas.paste(image, (column * width, 0))
    return canvas


def captioned(image: Image.Image, text: str, min_width: int = 384) -> Image.Image:
    """The image (scaled up by a whole factor to at least min_width, pixels kept sharp)
    over a white strip with the text, wrapped: a grid that says what it was asked."""
    scale = max(1, -(-min_width // image.width))
    shown = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    font = ImageFont.load_default()
    per_line = max(8, shown.width // 7)
    lines = textwrap.wrap(text, per_line)[:4] or [""]
    strip = 14 * len(lines) + 8
    canvas = Image.new("RGB", (shown.width, shown.height + strip), "white")
    canvas.paste(shown, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(lines):
        draw.text((4, shown.height + 4 + 14 * number), line, fill="black", font=font)
    return canvas


def generation_settings(config: RunConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline settings of every image generated during a run (validation grids and
    the control metric): the validation section's steps and guidance at data.resolution."""
    return {
        "num_inference_steps": config.validation.steps,
        "guidance_scale": config.validation.guidance_scale,
        "height": config.data.resolution,
        "width": config.data.resolution,
        **(extra or {}),
    }


def validation_seed(config: RunConfig) -> int:
    return config.validation.seed if config.validation.seed is not None else config.train.seed


def run_validation(
    family: Family,
    parts: Parts,
    method: Method,
    trained: Trained,
    pairs: list[ValidationPair],
    config: RunConfig,
    out_dir: Path,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[dict[str, Any]]:
    """Generate num_images per pair; write PNGs and a (conditioning | generated...) grid
    captioned with its prompt, and prompts.json. Stops before the next pair once
    `should_stop()` (a stop signal): what was made is kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = generation_settings(config, {"num_images_per_prompt": config.validation.num_images})
    seed = validation_seed(config)
    results = []
    with evaluating(trained):
        for index, pair in enumerate(pairs):
            if should_stop():
                break
            generator = torch.Generator(parts.denoiser.device).manual_seed(seed)
            with torch.no_grad():
                images = method.generate(family, parts, trained, pair.prompt, pair.image, settings, generator)
            for number, image in enumerate(images):
                image.save(out_dir / f"pair-{index:02d}-image-{number}.png")
            row = one_size(pair.shown + images)  # trackers stack it
            paths = [pair.image_path] if isinstance(pair.image_path, str) else pair.image_path or []
            shown = f"{pair.prompt!r}" + (f" | control: {', '.join(Path(p).name for p in paths)}" if paths else "")
            captioned(grid(row), shown).save(out_dir / f"pair-{index:02d}-grid.png")
            results.append({"prompt": pair.prompt, "image": pair.image_path, "images": images, "row": row})
    prompts = {f"pair-{i:02d}": {"prompt": r["prompt"], "image": r["image"]} for i, r in enumerate(results)}
    (out_dir / "prompts.json").write_text(json.dumps(prompts, indent=1))
    return results


def log_to_trackers(trackers: list[Any], results: list[dict[str, Any]], step: int) -> None:
    for tracker in trackers:
        for index, result in enumerate(results):
            key = f"validation/{index:02d} {result['prompt']}"
            if tracker.name == "tensorboard":
                stack = np.stack([np.asarray(image) for image in result["row"]])
                tracker.log_images({key: stack}, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({key: result["row"]}, step)
