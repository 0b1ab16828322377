"""Datasets for training: sources, transforms, reproducible samples, synthetic data."""

from __future__ import annotations

from pathlib import Path

from difftune.config import DataConfig
from difftune.data.samples import EpochSampler, TrainingSamples, collate
from difftune.data.sources import DataError, check_columns, check_files, load_rows, undecoded


def open_training_data(config: DataConfig, seed: int, needs_conditioning: bool) -> TrainingSamples:
    """Open and check the dataset (columns, referenced files) before any model loads."""
    rows = load_rows(config, seed)
    if len(rows) == 0:
        raise DataError(f"data.path {config.path!r}: the {config.split!r} split has no rows")
    columns = check_columns(rows, config, needs_conditioning)
    rows = undecoded(rows, columns)
    check_files(rows, columns, Path(config.path))
    return TrainingSamples(rows, columns, config, seed)


__all__ = ["DataError", "EpochSampler", "TrainingSamples", "collate", "open_training_data"]
