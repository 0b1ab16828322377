"""The rows a run will train on, checked before torch is imported: the dataset opened,
its columns found, every file's header scanned, bad rows refused or left out, and
max_samples applied. `open_training_data` turns these into samples."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.config import DataConfig
from difftune.data.check import DataReport, scan_rows
from difftune.data.sources import Columns, DataError, check_columns, load_rows, reference_cells, undecoded


@dataclass
class CheckedRows:
    rows: Any
    """The dataset (a datasets.Dataset), image columns undecoded."""
    columns: Columns
    report: DataReport
    keep: list[int]
    """The rows trained on, by their number in the dataset."""


def check_rows(config: DataConfig, seed: int, needs_conditioning: bool, fixed_caption: str | None = None,
               references: bool = False) -> CheckedRows:
    """Open and check the dataset (columns, and every file's header).

    Rows that cannot be trained on stop the run with the list, or with data.on_bad =
    "skip" are left out (the report names each). max_samples then keeps a seeded random
    subset of the good rows. Rows keep their number in the dataset for every message.
    With `fixed_caption`, every sample takes that prompt and no caption column is needed.
    With `references`, the conditioning column holds an edit's references (sources.Columns).
    """
    whole = config.model_copy(update={"max_samples": None})
    rows = load_rows(whole, seed)
    if len(rows) == 0:
        raise DataError(f"data.path {config.path!r}: the {config.split!r} split has no rows")
    columns = check_columns(rows, config, needs_conditioning, needs_captions=fixed_caption is None,
                            references=references)
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
        keep = sorted(keep[i] for i in _seeded_order(len(keep), seed)[: config.max_samples])
    return CheckedRows(rows, columns, report, keep)


def check_reference_counts(checked: CheckedRows, limit: int | None, pipeline: str) -> None:
    """No kept row has more references than the family's edit pipeline takes (`limit`)."""
    column = checked.columns.conditioning
    if limit is None or column is None or not checked.columns.references:
        return
    cells = checked.rows.select_columns([column]).with_format("python")[column]
    over = [row for row in checked.keep if len(reference_cells(cells[row])) > limit]
    if over:
        shown = ", ".join(str(row) for row in over[:5]) + (f" and {len(over) - 5} more" if len(over) > 5 else "")
        raise DataError(f"{checked.report.path}: row(s) {shown} of column {column!r} have more than {limit} "
                        f"reference image(s), and {pipeline} takes {limit} per prompt")


def data_identity(checked: CheckedRows) -> dict[str, Any]:
    """What a checkpoint records of the rows it trained on: how many, and a digest of
    their files (paths, and sizes of embedded images) and captions, in order. A resumed
    run whose rows differ would draw other batches; it is refused (training.plan).
    Computed on Arrow columns, without decoding or copying an image."""
    import pyarrow as pa

    table = checked.rows.with_format("arrow")[:]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(checked.keep).encode())
    for name in (checked.columns.image, checked.columns.conditioning, checked.columns.caption):
        if name is None:
            continue
        column = table.column(name).combine_chunks()
        if pa.types.is_struct(column.type):  # an undecoded image: {"bytes", "path"}
            digest.update(json.dumps(column.field("path").to_pylist()).encode())
            digest.update(json.dumps(pa.compute.binary_length(column.field("bytes")).to_pylist()).encode())
        else:
            digest.update(json.dumps(column.to_pylist(), default=str).encode())
    return {"rows": len(checked.keep), "digest": digest.hexdigest()}


def _seeded_order(count: int, seed: int) -> list[int]:
    """torch.randperm(count) under manual_seed(seed), as before this module was split off,
    so a max_samples subset stays the same rows; torch is imported only here."""
    import torch

    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
