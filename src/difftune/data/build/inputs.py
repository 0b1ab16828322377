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

A metadata row that cannot be read as a row (a name no file can have or that names the
folder itself, a conditioning image given as a number) stops the verb, naming the row;
a caption that is not text drops its image as `bad_caption`. A folder holding more than
one metadata file is refused, as `datasets` refuses it when training opens the folder.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path

from difftune.data.build.confine import (
    check_link_inside,
    clean_name,
    name_problem,
    outside_problem,
    resolved,
    resolves_inside,
    value_kind,
)
from difftune.data.sources import IMAGE_SUFFIXES, read_caption
from difftune.errors import DataError, InputError

CONDITIONING_KEYS = ("conditioning_image_file_name", "conditioning_image")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
"""The metadata files `datasets` reads in an imagefolder; it refuses a folder with two."""


@dataclass(frozen=True)
class Item:
    file: Path
    """The image, absolute."""
    name: str
    """Its path relative to the input folder: what the report and the output use."""
    conditioning: Path | None = None
    caption: str | None = None
    caption_problem: str | None = None
    """Why its caption file could not be read, or its metadata caption is not text (the
    image is then dropped, with this reason)."""
    outside: str | None = None
    """Which of its files points outside its folder: then none is read (and it is dropped)."""
    bad_name: str | None = None
    """Why its file name cannot be written into metadata.jsonl (not UTF-8): it is dropped."""


def read_inputs(folder: Path, conditioning: Path | None = None, captions: Path | None = None,
                caption_column: str = "text") -> list[Item]:
    if not folder.is_dir():
        raise InputError(f"IN = {str(folder)!r} is not a folder of images")
    if conditioning is not None and not conditioning.is_dir():
        raise InputError(f"--conditioning {str(conditioning)!r} is not a folder")
    metadata = metadata_file(folder, ("metadata.jsonl", "metadata.csv"))
    items = _metadata_items(folder, metadata, caption_column) if metadata else _scanned_items(folder, conditioning)
    if captions is not None:
        table = _caption_table(captions, caption_column)
        items = [replace(i, caption=table[i.name], caption_problem=None) if i.name in table else i for i in items]
    if conditioning is not None:
        items = [_with_conditioning(i, conditioning) for i in items]
    if not items:
        raise InputError(f"IN = {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def metadata_file(folder: Path, readable: tuple[str, ...]) -> Path | None:
    """The folder's one metadata file, of the `readable` kinds (None: it has none). Two
    are refused, as training refuses them (datasets: "Found metadata files with different
    extensions"): the verb would read one and training neither."""
    found = [name for name in sorted(METADATA_FILES) if (folder / name).is_file()]
    if len(found) > 1:
        raise DataError(f"IN = {str(folder)!r} holds both {' and '.join(found)}; training refuses a folder with "
                        "more than one metadata file: keep one")
    if found and found[0] not in readable:
        raise DataError(f"{folder / found[0]}: difftune data verbs read {' or '.join(readable)}; convert it to "
                        f"{readable[0]}")
    if not found:
        return None
    check_link_inside(folder, folder / found[0], "IN")
    return folder / found[0]


def _scanned_items(folder: Path, conditioning: Path | None) -> list[Item]:
    skip = resolved(conditioning) if conditioning is not None else None
    items = []
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if file.suffix.lower() not in IMAGE_SUFFIXES or file.is_dir() or any(p.startswith(".") for p in relative.parts):
            continue
        if skip is not None and skip in resolved(file).parents:
            continue  # the conditioning images, when their folder is inside IN
        if not resolves_inside(folder, file):
            items.append(Item(file, relative.as_posix(), outside=f"{relative.as_posix()} is a link that points "
                                                                 "outside IN"))
            continue
        if not utf8(relative.as_posix()):
            items.append(Item(file, relative.as_posix(), bad_name=f"{relative.as_posix()!r} is not UTF-8 text: "
                                                                  "metadata.jsonl cannot name it; rename the file"))
            continue
        items.append(_with_caption_file(folder, file, relative.as_posix()))
    return items


def _with_caption_file(folder: Path, file: Path, name: str) -> Item:
    """The image with the caption of NAME.txt beside it, if there is one."""
    text = file.with_suffix(".txt")
    if not text.exists() and not text.is_symlink():  # a broken or looping link is read, and its problem said
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
        where = f"{metadata}, row {number}:"
        name, (key, hint) = row.get("file_name"), _conditioning_hint(row, where)
        outside = outside_problem(folder, name, f"{where} file_name", "IN")
        if hint and not outside:
            outside = outside_problem(folder, hint, f"{where} {key}", "IN")
        if outside:  # kept as written, never read: the report names it
            items.append(Item(folder / name, name, folder / hint if hint else None, outside=outside))
            continue
        name = str(clean_name(name))  # "./a.png" and "a.png" are one file, and one output name
        conditioning = folder / str(clean_name(hint)) if hint else None
        caption, problem = _caption(row.get(caption_column), f"{where} {caption_column}")
        items.append(Item(folder / name, name, conditioning, caption, caption_problem=problem))
    return items


def _conditioning_hint(row: dict, where: str) -> tuple[str, str | None]:
    """(key, name) of the row's conditioning image; (key or "", None) when it has none
    (no key, null, or an empty csv cell). Any other value is no name: said, not skipped."""
    for key in CONDITIONING_KEYS:
        value = row.get(key)
        if value is None or value == "":
            continue
        problem = name_problem(value, f"{where} {key}", "IN")
        if problem:
            raise DataError(problem)
        return key, value
    return "", None


def _caption(value: object, where: str) -> tuple[str | None, str | None]:
    """(caption, why it is not one): a caption that is not text drops its image with the
    row named, as an unreadable caption file does, rather than training it uncaptioned."""
    if value is None or (isinstance(value, str) and utf8(value)):
        return value, None
    if isinstance(value, str):  # JSON's "\udcff": a lone surrogate, which no UTF-8 file can hold
        return None, f"{where} is not UTF-8 text (it holds an unpaired surrogate escape)"
    return None, f"{where} is {value_kind(value)}, not text"


def utf8(text: str) -> bool:
    """The text can be written as UTF-8 (it holds no lone surrogate: a file name of bytes
    that are not UTF-8, as Python decodes it, or JSON's "\udcff")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _caption_table(path: Path, caption_column: str) -> dict[str, str]:
    if not path.is_file():
        raise InputError(f"--captions {str(path)!r} is not a file")
    table = {}
    for number, row in enumerate(table_rows(path), start=1):
        name, text = row.get("file_name"), row.get(caption_column)
        if not isinstance(name, str) or not isinstance(text, str):
            raise DataError(f"{path}, row {number}: needs file_name and {caption_column!r} (text)")
        _, problem = _caption(text, f"{path}, row {number}: {caption_column}")
        if problem:
            raise DataError(problem)
        table[name] = text
    return table


def table_rows(path: Path) -> list[dict]:
    """Rows of a .jsonl or .csv file (UTF-8, with or without the byte order mark some
    editors write first: pandas, and so training, reads a csv either way)."""
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise InputError(f"{path}: captions and metadata are read from .jsonl or .csv files")
    text = _utf8_text(path)
    if path.suffix.lower() == ".csv":
        return _csv_rows(path, text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
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


def _utf8_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are named as `difftune data check`
    names them (data/diagnose.py), by line and byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # "utf-8-sig" would shift the error's byte offset
    except UnicodeDecodeError as bad:
        line, start = raw.count(b"\n", 0, bad.start) + 1, raw.rfind(b"\n", 0, bad.start) + 1
        raise DataError(f"{path}, line {line} is not UTF-8 text (byte {raw[bad.start]:#x} at {bad.start - start}); "
                        "save the file as UTF-8") from None


def _csv_rows(path: Path, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return list(reader)
    except csv.Error as error:  # a field over csv's size limit, a quote left open, ...
        raise DataError(f"{path}, line {reader.line_num}: not a readable csv row ({error})") from None


def _with_conditioning(item: Item, folder: Path) -> Item:
    """The item with its --conditioning image, when the folder has one of its name."""
    found = None if item.outside or item.bad_name else _match(folder, item.name)
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
    if _present(exact):
        return exact
    stem = exact.with_suffix("")
    return next((stem.with_suffix(s) for s in sorted(IMAGE_SUFFIXES) if _present(stem.with_suffix(s))), None)


def _present(path: Path) -> bool:
    """A file, or a link that leads nowhere (broken, or looping): that one is the
    conditioning image meant, and reading it names its problem."""
    return path.is_file() or (path.is_symlink() and not path.exists())
