"""Scan a training dataset and report every bad input before any model loads.

Two depths, one report format (`DataReport`, a list of `Finding`s by row, column, file):

- fast (``full=False``): headers only. Each file is opened with PIL and `verify()`ed,
  which reads as little as the format needs. Cheap enough to run before every
  training run. It catches missing, empty and unidentifiable files, size mismatches,
  small images, modes that get converted, and captions. PIL's `verify()` walks a PNG's
  chunks and checks their CRCs, so a truncated PNG is caught too (reported as
  `truncated`); but for JPEG, WebP, GIF, BMP and TIFF it checks nothing past the
  header, so a JPEG cut short passes. The other way round, a PNG that lacks only its
  final IEND chunk fails verify() (reported `truncated`) though it decodes fine.
  Duplicates are not looked for (that needs every byte).
- full (``full=True``, `difftune data check`): every file is read once, hashed (for
  byte-identical duplicate targets) and decoded completely (`Image.load()`), so any
  file that would fail during training fails here.

A finding is `fatal` when the sample cannot be trained on; the others are notes about
what training will do to a sample (upscale it, convert it to RGB, see it twice).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets

from difftune.config import DataConfig
from difftune.data.cells import ImageScanner, Scanned
from difftune.data.report import KINDS, DataReport, Finding
from difftune.data.sources import Columns, DataError, check_columns, load_rows, reference_cells, undecoded

MAX_ASPECT = 20
"""Longer side over shorter side beyond which an image cannot be trained on: its shorter
side would be scaled to data.resolution and its longer one 20 times that, to crop away
all but a sliver (a 20000x1 strip would take gigabytes)."""


def check_dataset(
    config: DataConfig,
    needs_conditioning: bool | None,
    fixed_caption: str | None = None,
    full: bool = True,
    references: bool = False,
) -> DataReport:
    """Open the dataset as training does and scan every row.

    data.max_samples is ignored: the whole split is scanned in its original order, so
    row numbers are those of the dataset on disk, not of a shuffled subset. Missing
    columns raise DataError, as when training opens the data. needs_conditioning None
    (a dataset checked without a run config) checks the conditioning and caption
    columns where the dataset has them.
    """
    whole = config.model_copy(update={"max_samples": None})
    rows = load_rows(whole, seed=0)
    needs_captions = fixed_caption is None
    if needs_conditioning is None:
        needs_conditioning = config.conditioning_image_column in rows.column_names
        needs_captions = config.caption_column in rows.column_names
    columns = check_columns(rows, whole, needs_conditioning, needs_captions=needs_captions, references=references)
    return scan_rows(undecoded(rows, columns), columns, whole, Path(config.path), full)


def scan_rows(
    rows: datasets.Dataset, columns: Columns, config: DataConfig, root: Path, full: bool
) -> DataReport:
    """Findings for every image and caption cell of `rows`; paths resolve against root."""
    rows = _undecoded(rows, columns)
    report = DataReport(path=str(config.path), rows=len(rows), checked_columns=[], full=full)
    if len(rows) == 0:
        message = f"the {config.split!r} split has no rows"
        report.findings.append(Finding(-1, "", None, "no_rows", message, True))
        return report
    scanner = ImageScanner(root, full)
    images = _scan_image_column(rows, columns.image, scanner, config.resolution, report)
    if columns.conditioning is not None and columns.references:
        _scan_reference_column(rows, columns.conditioning, scanner, report)
    elif columns.conditioning is not None:
        conditioning = _scan_image_column(rows, columns.conditioning, scanner, None, report)
        report.findings += _size_mismatches(images, conditioning, columns)
    if full:
        report.findings += _duplicates(images, columns.image)
    _scan_captions(rows, columns, config, report)
    # Grouped by row, then column in scan order, so a row's problems read together.
    order = {column: index for index, column in enumerate(report.checked_columns)}
    report.findings.sort(key=lambda f: (f.row, order.get(f.column, -1)))
    return report


def write_report(report: DataReport, path: Path) -> Path:
    """The report as JSON; written beside and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


# --- images -------------------------------------------------------------------------


def _undecoded(rows: datasets.Dataset, columns: Columns) -> datasets.Dataset:
    # scan_rows may be handed rows that decode images; decoding would hide bad files
    # inside `datasets` errors. Casting an already-undecoded column again is skipped.
    decoding = [
        c for c in (columns.image, columns.conditioning)
        if c is not None and isinstance(rows.features[c], datasets.Image) and rows.features[c].decode
    ]
    return undecoded(rows, columns) if decoding else rows


def _scan_image_column(
    rows: datasets.Dataset,
    column: str,
    scanner: ImageScanner,
    resolution: int | None,
    report: DataReport,
) -> list[Scanned | None]:
    """Scan one image column; `resolution` is given for the target only (size, hash)."""
    report.checked_columns.append(column)
    scanned = []
    for row, value in enumerate(rows[column]):
        findings, result = scanner.scan(value, row, column, hashed=resolution is not None)
        # Only the target is checked for size: the conditioning image is resized to the
        # target's size during training whatever its own size is.
        if result is not None and resolution is not None:
            findings += _extreme_aspect(result, row, column) or _too_small(result, row, column, resolution)
        report.findings += findings
        scanned.append(result)
    return scanned


def _scan_reference_column(rows: datasets.Dataset, column: str, scanner: ImageScanner, report: DataReport) -> None:
    """An edit's references: each image of each row (an empty cell is a row without one,
    which trains as text-to-image); their sizes are free, the family resizes them."""
    report.checked_columns.append(column)
    for row, value in enumerate(rows[column]):
        for cell in reference_cells(value):
            report.findings += scanner.scan(cell, row, column, hashed=False)[0]


def _extreme_aspect(scanned: Scanned, row: int, column: str) -> list[Finding]:
    width, height = scanned.size
    if max(width, height) <= MAX_ASPECT * min(width, height):
        return []
    message = (f"{width}x{height}: one side is more than {MAX_ASPECT} times the other; scaled to cover "
               "data.resolution it would take gigabytes and be cropped to a sliver")
    return [Finding(row, column, scanned.file, "extreme_aspect", message, True)]


def _too_small(scanned: Scanned, row: int, column: str, resolution: int) -> list[Finding]:
    width, height = scanned.size
    shorter = min(width, height)
    if shorter >= resolution:
        return []
    message = (f"{width}x{height} is smaller than data.resolution {resolution}: "
               f"upscaled {resolution / shorter:.2f}x (shorter side {shorter} -> {resolution})")
    return [Finding(row, column, scanned.file, "too_small", message, False)]


def _size_mismatches(
    images: list[Scanned | None], conditioning: list[Scanned | None], columns: Columns
) -> list[Finding]:
    findings = []
    for row, (image, hint) in enumerate(zip(images, conditioning)):
        if image is None or hint is None or image.size == hint.size:
            continue
        message = (f"conditioning image is {hint.size[0]}x{hint.size[1]} but the target "
                   f"{image.file or 'image'} is {image.size[0]}x{image.size[1]}")
        findings.append(Finding(row, str(columns.conditioning), hint.file, "size_mismatch", message, True))
    return findings


def _duplicates(images: list[Scanned | None], column: str) -> list[Finding]:
    first: dict[bytes, int] = {}
    findings = []
    for row, image in enumerate(images):
        if image is None or image.digest is None:
            continue
        earlier = first.setdefault(image.digest, row)
        if earlier != row:
            original = images[earlier]
            named = f" ({original.file})" if original is not None and original.file else ""
            message = (f"same bytes as the target of row {earlier}{named}: "
                       "this picture is trained on more than once per epoch")
            findings.append(Finding(row, column, image.file, "duplicate", message, False))
    return findings


# --- captions -----------------------------------------------------------------------


def _scan_captions(rows: datasets.Dataset, columns: Columns, config: DataConfig, report: DataReport) -> None:
    # A fixed prompt (DreamBooth) leaves the caption column unused: its problems are
    # reported as notes, if it exists at all, since training never reads it.
    column = columns.caption or config.caption_column
    if column not in rows.column_names:
        return
    used = columns.caption is not None
    report.checked_columns.append(column)
    for row, value in enumerate(rows[column]):
        problem = _caption_problem(value)
        if problem is not None:
            kind, message = problem
            if not used:
                message += " (unused: every sample takes the fixed prompt)"
            report.findings.append(Finding(row, column, None, kind, message, used))


def _caption_problem(value: Any) -> tuple[str, str] | None:
    if isinstance(value, (list, tuple)):
        if any(not isinstance(v, str) for v in value):
            kinds = ", ".join(sorted({type(v).__name__ for v in value if not isinstance(v, str)}))
            return "bad_caption", f"caption list holds non-text items ({kinds})"
        if not any(v.strip() for v in value):
            return "empty_caption", "caption list is empty" if not value else "every caption in the list is blank"
        return None
    if value is None:
        return "empty_caption", "caption is missing (null)"
    if not isinstance(value, str):
        return "bad_caption", f"caption must be text or a list of texts, got {type(value).__name__}"
    if not value.strip():
        return "empty_caption", "caption is empty" if not value else "caption is only whitespace"
    return None


__all__ = ["KINDS", "MAX_ASPECT", "DataError", "DataReport", "Finding", "check_dataset", "scan_rows", "write_report"]
