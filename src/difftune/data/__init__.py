"""Datasets for training: sources, checks, transforms, reproducible samples, synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftune.config import DataConfig
from difftune.data.buckets import BucketBatchSampler, assign_bucket, bucket_sizes, image_size
from difftune.data.check import DataReport, scan_rows
from difftune.data.samples import EpochSampler, TrainingSamples, collate
from difftune.data.sources import DataError, check_columns, load_rows, undecoded


def open_training_data(
    config: DataConfig, seed: int, needs_conditioning: bool, fixed_caption: str | None = None
) -> TrainingSamples:
    """Open and check the dataset (columns, and every file's header) before any model loads.

    Rows that cannot be trained on stop the run with the list, or with data.on_bad =
    "skip" are left out (the report, on `samples.report`, names each). max_samples then
    keeps a seeded random subset of the good rows. Rows keep their number in the dataset
    for every message. With `fixed_caption`, every sample takes that prompt and no caption
    column is needed.
    """
    whole = config.model_copy(update={"max_samples": None})
    rows = load_rows(whole, seed)
    if len(rows) == 0:
        raise DataError(f"data.path {config.path!r}: the {config.split!r} split has no rows")
    columns = check_columns(rows, config, needs_conditioning, needs_captions=fixed_caption is None)
    rows = undecoded(rows, columns)
    report = scan_rows(rows, columns, config, Path(config.path), full=False)
    bad = set(report.bad_rows())
    if bad and config.on_bad == "error":
        raise DataError(
            f"{len(bad)} row(s) of {config.path} cannot be trained on (data.on_bad = \"skip\" leaves them "
            f"out; `difftune data check` writes the full report):\n{report.summary(fatal_only=True)}"
        )
    keep = [index for index in range(len(rows)) if index not in bad]
    if not keep:
        raise DataError(f"data.path {config.path!r}: every row is bad:\n{report.summary(fatal_only=True)}")
    if config.max_samples is not None and config.max_samples < len(keep):
        order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed)).tolist()
        keep = sorted(keep[i] for i in order[: config.max_samples])
    sizes = bucket_of_rows(rows, columns, config, keep) if config.buckets else None
    samples = TrainingSamples(rows, columns, config, seed, fixed_caption, row_numbers=keep, sizes=sizes)
    samples.report = report
    return samples


def bucket_of_rows(rows: Any, columns: Any, config: DataConfig, keep: list[int]) -> list[tuple[int, int]]:
    """Each kept row's (width, height) bucket, from its target image's header."""
    sizes = bucket_sizes(config.resolution, config.bucket_step, config.bucket_max_aspect)
    if not sizes:
        raise DataError(f"data.bucket_step {config.bucket_step} leaves no bucket at resolution {config.resolution}")
    images = rows[columns.image]
    root = Path(config.path)
    return [
        assign_bucket(image_size(images[row], root, f"{config.path}, row {row}, column {columns.image!r}"),
                      sizes, config.bucket_no_upscale, config.bucket_step)
        for row in keep
    ]


__all__ = ["BucketBatchSampler", "DataError", "DataReport", "EpochSampler", "TrainingSamples", "collate", "open_training_data"]
