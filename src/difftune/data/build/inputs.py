"""What `difftune data prepare` reads: a folder of images, each with (optionally) a
conditioning image and a caption.

- an imagefolder (metadata.jsonl or metadata.csv: `file_name`, `text`, and
  `conditioning_image_file_name` or `conditioning_image`), as `prepare` itself writes;
- or any folder of images (any depth), a caption in `NAME.txt` beside an image;
- `--captions FILE` (.csv or .jsonl with `file_name` and a caption column) and
  `--conditioning FOLDER` (an image of the same relative name, any image suffix) add to
  either.

A file an item names outside its folder (a metadata `file_name` or conditioning name that
is absolute or climbs out with "..", a link, an image's caption file or its conditioning
image that resolves outside IN or --conditioning) is never read: the item carries why
(`Item.outside`), and `prepare` drops it with that reason, as it drops an unreadable
image, and lists it in its report (see confine.py).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

from difftune.data.build.confine import check_link_inside, clean_name, outside_problem, resolves_inside
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
    outside: str | None = None
    """Which of its files points outside its folder: then none is read (and it is dropped)."""


def read_inputs(folder: Path, conditioning: Path | None = None, captions: Path | None = None,
                caption_column: str = "text") -> list[Item]:
    if not folder.is_dir():
        raise InputError(f"IN = {str(folder)!r} is not a folder of images")
    if conditioning is not None and not conditioning.is_dir():
        raise InputError(f"--conditioning {str(conditioning)!r} is not a folder")
    metadata = next((folder / n for n in ("metadata.jsonl", "metadata.csv") if (folder / n).is_file()), None)
    if metadata is not None:
        check_link_inside(folder, metadata, "IN")
    items = _metadata_items(folder, metadata, caption_column) if metadata else _scanned_items(folder, conditioning)
    if captions is not None:
        table = _caption_table(captions, caption_column)
        items = [replace(i, caption=table[i.name], caption_problem=None) if i.name in table else i for i in items]
    if conditioning is not None:
        items = [_with_conditioning(i, conditioning) for i in items]
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
        if not resolves_inside(folder, file):
            items.append(Item(file, relative.as_posix(), outside=f"{relative.as_posix()} is a link that points "
                                                                 "outside IN"))
            continue
        items.append(_with_caption_file(folder, file, relative.as_posix()))
    return items


def _with_caption_file(folder: Path, file: Path, name: str) -> Item:
    """The image with the caption of NAME.txt beside it, if there is one."""
    text = file.with_suffix(".txt")
    if not text.exists():
        return Item(file, name)
    if not resolves_inside(folder, text):
        return Item(file, name, outside=f"its caption file {text.name} is a link that points outside IN")
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
        key, hint = next(((k, row[k]) for k in CONDITIONING_KEYS if isinstance(row.get(k), str) and row[k]),
                         ("", None))
        caption = row.get(caption_column)
        outside = outside_problem(folder, name, f"{metadata}, row {number}: file_name", "IN")
        if hint and not outside:
            outside = outside_problem(folder, hint, f"{metadata}, row {number}: {key}", "IN")
        if outside:  # kept as written, never read: the report names it
            items.append(Item(folder / name, name, folder / hint if hint else None, outside=outside))
            continue
        name = str(clean_name(name))  # "./a.png" and "a.png" are one file, and one output name
        conditioning = folder / str(clean_name(hint)) if hint else None
        items.append(Item(folder / name, name, conditioning, caption if isinstance(caption, str) else None))
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


def _with_conditioning(item: Item, folder: Path) -> Item:
    """The item with its --conditioning image, when the folder has one of its name."""
    found = None if item.outside else _match(folder, item.name)
    if found is None:
        return item
    if not resolves_inside(folder, found):
        return replace(item, conditioning=found,
                       outside=item.outside or f"its conditioning image {found} points outside --conditioning")
    return replace(item, conditioning=found)


def _match(folder: Path, name: str) -> Path | None:
    """The conditioning image named like the image: the same relative path, or the same
    stem with another image suffix (photo.jpg -> photo.png)."""
    exact = folder / name
    if exact.is_file():
        return exact
    stem = exact.with_suffix("")
    return next((stem.with_suffix(s) for s in sorted(IMAGE_SUFFIXES) if stem.with_suffix(s).is_file()), None)
