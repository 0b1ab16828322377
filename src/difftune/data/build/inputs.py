"""What `difftune data prepare` reads: a folder of images, each with (optionally) a
conditioning image and a caption.

- an imagefolder (metadata.jsonl or metadata.csv: `file_name`, `text`, and
  `conditioning_image_file_name` or `conditioning_image`), as `prepare` itself writes;
- or any folder of images (any depth), a caption in `NAME.txt` beside an image;
- `--captions FILE` (.csv or .jsonl with `file_name` and a caption column) and
  `--conditioning FOLDER` (an image of the same relative name, any image suffix) add to
  either.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from difftune.data.sources import IMAGE_SUFFIXES, read_caption
from difftune.errors import DataError, InputError

CONDITIONING_KEYS = ("conditioning_image_file_name", "conditioning_image")


@dataclass(frozen=True)
class Item:
    file: Path
    """The image, absolute."""
    name: str
    """Its path relative to the input folder: what the report and the output use."""
    conditioning: Path | None = None
    caption: str | None = None
    caption_problem: str | None = None
    """Why its caption file could not be read (the image is then dropped, with this reason)."""


def read_inputs(folder: Path, conditioning: Path | None = None, captions: Path | None = None,
                caption_column: str = "text") -> list[Item]:
    if not folder.is_dir():
        raise InputError(f"IN = {str(folder)!r} is not a folder of images")
    if conditioning is not None and not conditioning.is_dir():
        raise InputError(f"--conditioning {str(conditioning)!r} is not a folder")
    metadata = next((folder / n for n in ("metadata.jsonl", "metadata.csv") if (folder / n).is_file()), None)
    items = _metadata_items(folder, metadata, caption_column) if metadata else _scanned_items(folder, conditioning)
    if captions is not None:
        table = _caption_table(captions, caption_column)
        items = [Item(i.file, i.name, i.conditioning, table.get(i.name, i.caption),
                      None if i.name in table else i.caption_problem) for i in items]
    if conditioning is not None:
        items = [Item(i.file, i.name, _match(conditioning, i.name) or i.conditioning, i.caption, i.caption_problem)
                 for i in items]
    if not items:
        raise InputError(f"IN = {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def _scanned_items(folder: Path, conditioning: Path | None) -> list[Item]:
    skip = conditioning.resolve() if conditioning is not None else None
    items = []
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if file.suffix.lower() not in IMAGE_SUFFIXES or file.is_dir() or any(p.startswith(".") for p in relative.parts):
            continue
        if skip is not None and skip in file.resolve().parents:
            continue  # the conditioning images, when their folder is inside IN
        items.append(_with_caption_file(file, relative.as_posix()))
    return items


def _with_caption_file(file: Path, name: str) -> Item:
    """The image with the caption of NAME.txt beside it, if there is one."""
    text = file.with_suffix(".txt")
    if not text.exists():
        return Item(file, name)
    try:
        return Item(file, name, caption=read_caption(text))
    except DataError as problem:
        return Item(file, name, caption_problem=str(problem))


def _metadata_items(folder: Path, metadata: Path, caption_column: str) -> list[Item]:
    items = []
    for number, row in enumerate(table_rows(metadata), start=1):
        name = row.get("file_name")
        if not isinstance(name, str) or not name:
            raise DataError(f"{metadata}, row {number}: no file_name")
        hint = next((row[k] for k in CONDITIONING_KEYS if isinstance(row.get(k), str) and row[k]), None)
        caption = row.get(caption_column)
        items.append(Item(folder / name, name, folder / hint if hint else None,
                          caption if isinstance(caption, str) else None))
    return items


def _caption_table(path: Path, caption_column: str) -> dict[str, str]:
    if not path.is_file():
        raise InputError(f"--captions {str(path)!r} is not a file")
    table = {}
    for number, row in enumerate(table_rows(path), start=1):
        name, text = row.get("file_name"), row.get(caption_column)
        if not isinstance(name, str) or not isinstance(text, str):
            raise DataError(f"{path}, row {number}: needs file_name and {caption_column!r} (text)")
        table[name] = text
    return table


def table_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl or .csv file."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if path.suffix.lower() != ".jsonl":
        raise InputError(f"{path}: captions and metadata are read from .jsonl or .csv files")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: not JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: not a JSON object")
        rows.append(row)
    return rows


def _match(folder: Path, name: str) -> Path | None:
    """The conditioning image named like the image: the same relative path, or the same
    stem with another image suffix (photo.jpg -> photo.png)."""
    exact = folder / name
    if exact.is_file():
        return exact
    stem = exact.with_suffix("")
    return next((stem.with_suffix(s) for s in sorted(IMAGE_SUFFIXES) if stem.with_suffix(s).is_file()), None)
