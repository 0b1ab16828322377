"""Training samples from checked rows: buckets assigned, samples built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftune.config import DataConfig
from difftune.data.buckets import assign_bucket, bucket_sizes, image_size
from difftune.data.rows import CheckedRows, check_rows
from difftune.data.samples import TrainingSamples
from difftune.data.sources import DataError, ReferenceLimit


def open_training_data(
    config: DataConfig, seed: int, needs_conditioning: bool, fixed_caption: str | None = None,
    checked: CheckedRows | None = None, references: bool = False, reference_limit: ReferenceLimit | None = None,
) -> TrainingSamples:
    """The samples of the checked rows (`checked`, or checked now: see data.rows.check_rows);
    the data check's report is on `samples.report`. With data.streaming, the stream's
    samples (its first row checked: see data.stream_checks), an edit's refusing a row with
    more references than `reference_limit` as it reads it (rows read whole are counted
    before: training.source_checks.check_edit_rows)."""
    if config.streaming:
        from difftune.data.stream_checks import check_stream
        from difftune.data.streaming import StreamingSamples

        columns = check_stream(config, needs_conditioning, fixed_caption, references, reference_limit)
        return StreamingSamples(config, seed, columns, fixed_caption, reference_limit)  # type: ignore[return-value]
    checked = checked or check_rows(config, seed, needs_conditioning, fixed_caption, references)
    rows, columns, keep = checked.rows, checked.columns, checked.keep
    sizes = bucket_of_rows(rows, columns, config, keep) if config.buckets else None
    samples = TrainingSamples(rows, columns, config, seed, fixed_caption, row_numbers=keep, sizes=sizes)
    samples.report = checked.report
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
