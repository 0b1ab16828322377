"""Control fidelity at validation: generate for held-out conditionings, score, compare
with the floor (the same base with its control switched off)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from difftune.config import DataConfig, RunConfig
from difftune.data.check import scan_rows
from difftune.data.sources import (
    Columns,
    DataError,
    check_columns,
    load_rows,
    open_image,
    reference_cells,
    undecoded,
)
from difftune.families.base import Family, Parts
from difftune.methods.base import Method, Trained, evaluating
from difftune.metrics import METRICS, ControlMetric, mean_scores
from difftune.validation import captioned, generation_settings, grid, validation_seed

CHUNK = 16  # images generated per pipeline call


@dataclass(frozen=True)
class MetricSet:
    """Held-out (conditioning image, caption) pairs and the metric that scores them."""

    metric: ControlMetric
    conditionings: list[Image.Image]
    captions: list[str]


def load_metric_set(config: RunConfig) -> MetricSet | None:
    """Open validation.metric_data now, so a bad path fails before any model loads."""
    validation = config.validation
    if validation.metric == "none":
        return None
    data = DataConfig(
        path=validation.metric_data,
        resolution=config.data.resolution,
        conditioning_image_column=config.data.conditioning_image_column,
        reference_image_column=config.data.reference_image_column,
        caption_column=config.data.caption_column,
        image_column=config.data.image_column,
    )
    rows = load_rows(data, seed=0, key="validation.metric_data")
    references = config.method.takes_references  # an edit's: scored with each row's (first) reference
    columns = check_columns(rows, data, needs_conditioning=True, references=references)
    count = min(validation.metric_samples, len(rows))
    only_conditioning = Columns(image=columns.conditioning, caption=columns.caption, conditioning=None)
    rows = undecoded(rows.select(range(count)), only_conditioning)
    report = scan_rows(rows, only_conditioning, data, Path(data.path), full=False) if not references else None
    if report is not None and not report.ok:
        raise DataError(f"validation.metric_data has rows that cannot be read:\n{report.summary(fatal_only=True)}")
    size = (config.data.resolution, config.data.resolution)
    conditionings, captions = [], []
    for index in range(count):
        row = rows[index]
        where = f"validation.metric_data {data.path}, row {index}, column {columns.conditioning!r}"
        cells = reference_cells(row[columns.conditioning]) if references else [row[columns.conditioning]]
        if not cells:
            raise DataError(f"{where}: no reference image; the edit metric scores an edit of each row's reference")
        image = open_image(cells[0], Path(data.path), where)
        # a reference as it is: the family's edit_arguments (or its pipeline) sizes it as training did
        conditionings.append(image if references else image.resize(size))
        caption = row[columns.caption]
        captions.append(caption[0] if isinstance(caption, list) else caption)
    if not conditionings:
        raise DataError(f"validation.metric_data {data.path}: no rows")
    return MetricSet(METRICS[validation.metric], conditionings, captions)


def score_control(
    family: Family,
    parts: Parts,
    method: Method,
    trained: Trained,
    metric_set: MetricSet,
    config: RunConfig,
    out_dir: Path | None,
    extra_settings: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, float]:
    """Mean metric over the held-out set; writes a sample grid (conditioning over output).
    Once `should_stop()` (a stop signal) it stops generating and scores what it has."""
    settings = generation_settings(config, extra_settings)
    seed = validation_seed(config)
    generated: list[Image.Image] = []
    with evaluating(trained):
        for start in range(0, len(metric_set.captions), CHUNK):
            if should_stop() and generated:
                break
            generator = torch.Generator(parts.vae.device).manual_seed(seed + start)
            prompts = metric_set.captions[start : start + CHUNK]
            images = metric_set.conditionings[start : start + CHUNK]
            with torch.no_grad():
                generated += method.generate(family, parts, trained, prompts, images, settings, generator)
    scores = [metric_set.metric.score(g, c, p) for g, c, p in
              zip(generated, metric_set.conditionings, metric_set.captions)]
    if out_dir is not None and generated:
        out_dir.mkdir(parents=True, exist_ok=True)
        shown = slice(0, 8)
        cell = generated[0].size  # a reference kept at its own size is shown at its edit's
        top, bottom = grid(metric_set.conditionings[shown], cell), grid(generated[shown], cell)
        sheet = Image.new("RGB", (top.width, top.height * 2))
        sheet.paste(top, (0, 0))
        sheet.paste(bottom, (0, top.height))
        captions = "; ".join(f"{i}: {c}" for i, c in enumerate(metric_set.captions[shown]))
        captioned(sheet, f"held-out conditionings (top), generated (below); captions {captions}").save(
            out_dir / "metric-grid.png")
    return mean_scores(scores)
