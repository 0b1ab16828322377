"""Datasets for training: sources, transforms, reproducible samples, synthetic data."""

from __future__ import annotations

from pathlib import Path

from difftune.config import DataConfig
from difftune.data.samples import EpochSampler, TrainingSamples, collate
from difftune.data.sources import DataError, check_columns, check_files, load_rows, undecoded


def open_training_data(
    config: DataConfig, seed: int, needs_conditioning: bool, fixed_caption: str | None = None
) -> TrainingSamples:
    """Open and check the dataset (columns, referenced files) before any model loads.

    With `fixed_caption`, every sample takes that prompt and no caption column is needed.
    """
    rows = load_rows(config, seed)
    if len(rows) == 0:
        raise DataError(f"data.path {config.path!r}: the {config.split!r} split has no rows")
    columns = check_columns(rows, config, needs_conditioning, needs_captions=fixed_caption is None)
    rows = undecoded(rows, columns)
    check_files(rows, columns, Path(config.path))
    return TrainingSamples(rows, columns, config, seed, fixed_caption)


__all__ = ["DataError", "EpochSampler", "TrainingSamples", "collate", "open_training_data"]
