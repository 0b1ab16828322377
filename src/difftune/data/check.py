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

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from difftune.config import DataConfig
from difftune.data.sources import (
    Columns,
    DataError,
    check_columns,
    load_rows,
    regular_file_problem,
    undecoded,
)

KINDS = (
    "missing_file",
    "not_a_file",
    "outside_dataset",
    "zero_byte",
    "unreadable",
    "truncated",
    "not_an_image_cell",
    "size_mismatch",
    "too_small",
    "extreme_aspect",
    "cmyk",
    "sixteen_bit",
    "palette",
    "alpha",
    "empty_caption",
    "bad_caption",
    "duplicate",
    "no_rows",
)

SUMMARY_FINDINGS = 20
MAX_ASPECT = 20
"""Longer side over shorter side beyond which an image cannot be trained on: its shorter
side would be scaled to data.resolution and its longer one 20 times that, to crop away
all but a sliver (a 20000x1 strip would take gigabytes)."""


@dataclass
class Finding:
    row: int
    """Index in the dataset as loaded (before max_samples and shuffling); -1 for the whole dataset."""
    column: str
    """The config's column name, e.g. "image", "conditioning_image", "text"."""
    file: str | None
    """The path as written in the dataset (relative to data.path when under it); None for bytes."""
    kind: str
    """One of KINDS."""
    message: str
    fatal: bool
    """True: the sample cannot be trained on. False: a note (converted, upscaled, duplicate)."""


@dataclass
class DataReport:
    path: str
    rows: int
    checked_columns: list[str]
    findings: list[Finding] = field(default_factory=list)
    full: bool = True

    @property
    def ok(self) -> bool:
        """No fatal finding: every sample can be trained on."""
        return not any(f.fatal for f in self.findings)

    def bad_rows(self) -> list[int]:
        """Rows with a fatal finding, sorted (dataset-wide findings are not rows)."""
        return sorted({f.row for f in self.findings if f.fatal and f.row >= 0})

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
        return counts

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "rows": self.rows,
            "full": self.full,
            "checked_columns": list(self.checked_columns),
            "bad_rows": self.bad_rows(),
            "counts": self.counts(),
            "findings": [asdict(f) for f in self.findings],
        }

    def summary(self, fatal_only: bool = False) -> str:
        """Counts per kind, then findings (what stops training first; with fatal_only,
        only those)."""
        bad = self.bad_rows()
        depth = "full scan (every file decoded)" if self.full else "fast scan (headers only)"
        lines = [f"{self.path}: {self.rows} rows, {len(bad)} bad, {depth}"]
        if bad:
            more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
            lines.append(f"  bad rows: {', '.join(map(str, bad[:20]))}{more}")
        fatal_kinds = {f.kind for f in self.findings if f.fatal}
        for kind, count in self.counts().items():
            lines.append(f"  {kind}: {count}{'' if kind in fatal_kinds else ' (note)'}")
        # What stops training first, then the notes.
        listed = [f for f in self.findings if f.fatal or not fatal_only]
        shown = sorted(listed, key=lambda f: not f.fatal)[:SUMMARY_FINDINGS]
        for finding in shown:
            where = "dataset" if finding.row < 0 else f"row {finding.row}"
            file = f", {finding.file}" if finding.file else ""
            lines.append(f"  {where}, {finding.column}{file}: {finding.message}")
        if len(listed) > SUMMARY_FINDINGS:
            lines.append(f"  ... and {len(listed) - SUMMARY_FINDINGS} more findings")
        if not self.findings:
            lines.append("  no problems found")
        return "\n".join(lines)


def check_dataset(
    config: DataConfig,
    needs_conditioning: bool | None,
    fixed_caption: str | None = None,
    full: bool = True,
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
    columns = check_columns(rows, whole, needs_conditioning, needs_captions=needs_captions)
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
    scanner = _ImageScanner(root, full)
    images = _scan_image_column(rows, columns.image, scanner, config.resolution, report)
    if columns.conditioning is not None:
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


@dataclass
class _Scanned:
    """What one readable image cell told us (None for a cell with a fatal finding)."""

    size: tuple[int, int]
    file: str | None
    digest: bytes | None


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
    scanner: _ImageScanner,
    resolution: int | None,
    report: DataReport,
) -> list[_Scanned | None]:
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


class _ImageScanner:
    """Reads image cells (paths under root, bytes, undecoded Image dicts)."""

    def __init__(self, root: Path, full: bool) -> None:
        self.root = root
        self.full = full
        # Absolute paths (imagefolder's) are shown relative to the dataset folder.
        self.prefix = str(root.resolve()) + os.sep

    def scan(
        self, value: Any, row: int, column: str, hashed: bool
    ) -> tuple[list[Finding], _Scanned | None]:
        """Findings for one cell, and what it told us (None when it cannot be trained on)."""
        source, file, label = self._source(value)

        def finding(kind: str, message: str, fatal: bool = True) -> Finding:
            # A path is in Finding.file already; bytes have none, so the message says what they are.
            return Finding(row, column, file, kind, f"{label}: {message}" if label else message, fatal)

        if source is None:
            message = f"expected a path, bytes or an image, got {type(value).__name__}"
            return [finding("not_an_image_cell", message)], None
        if self.escapes(source, file):
            return [finding("outside_dataset", f"{file} points outside the dataset folder {self.root}")], None
        data, problem = self._read(source)
        if problem is not None:
            return [finding(*problem)], None
        readable = data if data is not None else source
        try:
            image = Image.open(io.BytesIO(data) if data is not None else source)
        except Exception as error:  # PIL raises many types for a file it cannot identify
            return [finding("unreadable", _unidentified(error, readable))], None
        with image:
            header = _Header.of(image)
            try:
                # verify() checks what the format allows without decoding; load() decodes all.
                image.load() if self.full else image.verify()
            except Exception as error:
                message = f"the header reads ({header.describe()}) but the data does not ({_error(error)})"
                return [finding("truncated", message)], None
        notes = [finding(kind, message, fatal=False) for kind, message in header.mode_notes()]
        digest = None
        if hashed and self.full and data is not None:
            digest = hashlib.blake2b(data, digest_size=16).digest()
        return notes, _Scanned(header.size, file, digest)

    def _source(self, value: Any) -> tuple[Path | bytes | None, str | None, str]:
        """(what to read, the file as written or None, a label for messages about bytes)."""
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data or (data is not None and not path):
                # Embedded bytes win, as in sources.py; their "path" is only the original name.
                named = f" (originally {path})" if path else ""
                return bytes(data), None, f"embedded image bytes{named}"
            value = path
        if isinstance(value, (bytes, bytearray)):
            return bytes(value), None, "image bytes"
        if isinstance(value, str) and value:
            file = value.removeprefix(self.prefix)
            return self.root / value, file, ""
        return None, None, ""

    def escapes(self, source: Path | bytes, file: str | None) -> bool:
        """A relative path that leads out of the dataset folder ("../../x.png")."""
        if not isinstance(source, Path) or file is None or Path(file).is_absolute():
            return False
        # Lexically, not through symlinks: a link to a file kept elsewhere is fine. The folder
        # may itself be a link, and datasets gives paths through its target.
        path = os.path.abspath(source)
        inside = (os.path.abspath(self.root) + os.sep, os.path.realpath(self.root) + os.sep)
        return self.root.is_dir() and not path.startswith(inside)

    def _read(self, source: Path | bytes) -> tuple[bytes | None, tuple[str, str] | None]:
        """The bytes to decode (None: let PIL read the file, headers only), or a problem."""
        if isinstance(source, bytes):
            return source, (("zero_byte", "the image bytes are empty") if not source else None)
        problem = regular_file_problem(source)
        if problem == "no such file":
            return None, ("missing_file", f"no such file {source}")
        if problem:
            return None, ("not_a_file", f"{source}: {problem}")
        try:
            if self.full:
                data = source.read_bytes()  # read once: hashed and decoded from memory
                size = len(data)
            else:
                data, size = None, source.stat().st_size
        except FileNotFoundError:
            return None, ("missing_file", f"no such file {source}")
        except OSError as error:
            return None, ("unreadable", f"cannot read {source} ({_error(error)})")
        if size == 0:
            return None, ("zero_byte", "the file is empty (0 bytes)")
        return data, None


@dataclass
class _Header:
    size: tuple[int, int]
    mode: str
    format: str | None
    rawmode: str
    transparency: bool

    @classmethod
    def of(cls, image: Image.Image) -> _Header:
        # The tile's raw mode is the only place PIL keeps a PNG's 16-bit depth once it
        # has chosen an 8-bit mode (RGB;16B is read as RGB); it is gone after load().
        tile = getattr(image, "tile", None) or []
        rawmode = tile[0][3] if tile and isinstance(tile[0][3], str) else ""
        return cls(image.size, image.mode, image.format, rawmode, "transparency" in image.info)

    def describe(self) -> str:
        return f"{self.format or 'image'} {self.size[0]}x{self.size[1]} {self.mode}"

    def mode_notes(self) -> list[tuple[str, str]]:
        """(kind, message) for each way convert("RGB") changes this image, as training does."""
        mode, notes = self.mode, []
        if mode == "CMYK":
            notes.append(("cmyk", (
                "CMYK image: converted to RGB with PIL's plain formula R = (255-C)(255-K)/255 "
                "(likewise G, B), ignoring any ICC profile, so colours may shift"
            )))
        if mode.startswith("I;16") or mode in ("I", "F"):
            depth = {"I": "32-bit integer", "F": "32-bit float"}.get(mode, "16-bit")
            how = {"I": "divided by 257 when any value is above 255", "F": "times 255 when all are within 0-1"}
            notes.append(("sixteen_bit", (
                f"{depth} greyscale image (mode {mode}): rescaled to 8 bits (values "
                f"{how.get(mode, 'divided by 257: the 16-bit range onto 0-255')}) and converted to RGB"
            )))
        elif self.format == "PNG" and ";16" in self.rawmode:
            notes.append(("sixteen_bit", (
                f"16-bit-per-channel PNG: PIL reads it as {mode}, keeping the high byte of each "
                "value (8-bit precision), then converts it to RGB"
            )))
        if mode in ("P", "PA"):
            notes.append(("palette", (
                f"palette image (mode {mode}): converted to RGB by looking up each pixel's palette colour"
            )))
        if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            notes.append(("alpha", (
                f"mode {mode} has an alpha channel: converted to RGB by dropping it, not compositing, "
                "so transparent pixels train with whatever colour they store"
            )))
        elif self.transparency:
            notes.append(("alpha", (
                f"mode {mode} with a transparent colour: converted to RGB ignoring the transparency, "
                "so transparent pixels train with their stored colour"
            )))
        return notes


def _extreme_aspect(scanned: _Scanned, row: int, column: str) -> list[Finding]:
    width, height = scanned.size
    if max(width, height) <= MAX_ASPECT * min(width, height):
        return []
    message = (f"{width}x{height}: one side is more than {MAX_ASPECT} times the other; scaled to cover "
               "data.resolution it would take gigabytes and be cropped to a sliver")
    return [Finding(row, column, scanned.file, "extreme_aspect", message, True)]


def _too_small(scanned: _Scanned, row: int, column: str, resolution: int) -> list[Finding]:
    width, height = scanned.size
    shorter = min(width, height)
    if shorter >= resolution:
        return []
    message = (f"{width}x{height} is smaller than data.resolution {resolution}: "
               f"upscaled {resolution / shorter:.2f}x (shorter side {shorter} -> {resolution})")
    return [Finding(row, column, scanned.file, "too_small", message, False)]


def _size_mismatches(
    images: list[_Scanned | None], conditioning: list[_Scanned | None], columns: Columns
) -> list[Finding]:
    findings = []
    for row, (image, hint) in enumerate(zip(images, conditioning)):
        if image is None or hint is None or image.size == hint.size:
            continue
        message = (f"conditioning image is {hint.size[0]}x{hint.size[1]} but the target "
                   f"{image.file or 'image'} is {image.size[0]}x{image.size[1]}")
        findings.append(Finding(row, str(columns.conditioning), hint.file, "size_mismatch", message, True))
    return findings


def _duplicates(images: list[_Scanned | None], column: str) -> list[Finding]:
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


def _unidentified(error: BaseException, source: Path | bytes) -> str:
    if not isinstance(error, UnidentifiedImageError):
        return f"PIL cannot open it ({_error(error)})"
    # PIL's own message names a BytesIO object; the first bytes say more (text, HTML, a
    # Git LFS pointer, ...).
    start = source[:16] if isinstance(source, bytes) else b""
    if isinstance(source, Path):
        try:
            with source.open("rb") as handle:
                start = handle.read(16)
        except OSError:
            pass
    return f"not an image PIL recognises (it starts with {start!r})"


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


__all__ = ["KINDS", "DataError", "DataReport", "Finding", "check_dataset", "scan_rows", "write_report"]
