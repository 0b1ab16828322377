"""Datasets for training: sources, checks, transforms, reproducible samples, synthetic data.

The names below are imported when first used (PEP 562), so that the checks (sources,
check, rows, diagnose) run before torch is imported: a bad dataset is reported in about
a second.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "BucketBatchSampler": "difftune.data.buckets",
    "CheckedRows": "difftune.data.rows",
    "check_rows": "difftune.data.rows",
    "DataError": "difftune.errors",
    "DataReport": "difftune.data.check",
    "EpochSampler": "difftune.data.samples",
    "TrainingSamples": "difftune.data.samples",
    "collate": "difftune.data.samples",
    "open_training_data": "difftune.data.training",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'difftune.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


__all__ = sorted(_WHERE)
