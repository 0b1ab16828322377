"""The forms a built dataset is written in, each one `difftune train` reads as it is:

  imagefolder  images/..., conditioning_images/..., metadata.jsonl (file_name, text,
               conditioning_image_file_name): `datasets` loads both image columns as images
  hf           `Dataset.save_to_disk` (image, conditioning_image, text), and
               `push_to_hub` when a repository is named
  webdataset   .tar shards: KEY.EXT (image), KEY.conditioning.EXT, KEY.txt; read with
               data.streaming (image_column = EXT, conditioning_image_column =
               "conditioning.EXT", caption_column = "txt")

Files are copied byte for byte (imagefolder) or their bytes stored (webdataset, hf), never
decoded and saved again: the dataset holds what the user gave, EXIF and all.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from difftune.data.build.confine import inside_name
from difftune.data.build.jobs import write_metadata
from difftune.errors import InputError

FORMATS = ("imagefolder", "hf", "webdataset")
IMAGES, CONDITIONING = "images", "conditioning_images"


@dataclass(frozen=True)
class Row:
    image: Path
    name: str
    """The image's path inside the dataset, relative to images/."""
    conditioning: Path | None
    caption: str | None


def output_name(name: str) -> str:
    """An input already laid out as images/... keeps its path, without a second images/.
    Never a name that leads out of images/ (confine.inside_name)."""
    name = inside_name(name, f"OUT/{IMAGES}")
    return inside_name(name[len(IMAGES) + 1:] if name.startswith(f"{IMAGES}/") else name, f"OUT/{IMAGES}")


def conditioning_target(name: str, conditioning: Path) -> str:
    """Where an image's conditioning image goes: its output name under conditioning_images/,
    with the conditioning file's own suffix."""
    return (Path(CONDITIONING) / output_name(name)).with_suffix(conditioning.suffix.lower()).as_posix()


def write(rows: list[Row], out: Path, form: str, shard_size: int = 1000, shown_as: Path | None = None) -> dict:
    """Write the rows into `out`, and nothing else of this form stays there (a resumed
    run's inputs may have changed); returns where they went (for the report), as paths
    under `shown_as` (the OUT a replacement folder becomes) or `out`."""
    def shown(path: Path) -> str:
        return str((shown_as or out) / path.relative_to(out))

    if form == "imagefolder":
        return {"metadata": shown(write_imagefolder(rows, out))}
    if form == "webdataset":
        return {"shards": [shown(p) for p in write_webdataset(rows, out, shard_size)]}
    hf_dataset(rows).save_to_disk(str(out))
    _remove_stale_arrow(out)
    return {"save_to_disk": shown(out)}


def push_saved(out: Path, repo: str) -> None:
    """Push a dataset `write` saved (form hf) to the Hub; a failure keeps it and says how
    to push it later."""
    import datasets

    try:
        datasets.load_from_disk(str(out)).push_to_hub(repo)
    except Exception as error:  # noqa: BLE001 (network, auth and Hub errors: the dataset is kept)
        raise InputError(f"--push-to-hub {repo}: {type(error).__name__}: {str(error).splitlines()[0]}. "
                         f"The dataset is saved in {out}; push it later with "
                         f"datasets.load_from_disk({str(out)!r}).push_to_hub({repo!r})") from None


def _remove_stale_arrow(out: Path) -> None:
    """save_to_disk leaves an earlier save's data files beside its own (fewer shards this
    time): those state.json does not list are removed."""
    import json

    listed = {entry.get("filename") for entry in json.loads((out / "state.json").read_text()).get("_data_files", [])}
    for file in out.glob("data-*.arrow"):
        if file.name not in listed:
            file.unlink()


def write_imagefolder(rows: list[Row], out: Path) -> Path:
    records = []
    for row in rows:
        record: dict[str, Any] = {"file_name": f"{IMAGES}/{row.name}"}
        copy_file(row.image, out / IMAGES / row.name)
        if row.conditioning is not None:
            target = conditioning_target(row.name, row.conditioning)
            copy_file(row.conditioning, out / target)
            record["conditioning_image_file_name"] = target
        if row.caption is not None:
            record["text"] = row.caption
        records.append(record)
    path = write_metadata(out, records)
    remove_unlisted(out, {r["file_name"] for r in records} | {r.get("conditioning_image_file_name") for r in records})
    return path


def remove_unlisted(out: Path, listed: set[str | None]) -> None:
    """Files an earlier run into this OUT copied and this one does not keep (it was run
    again with other filters): the dataset holds what its metadata lists, no more."""
    for folder in (out / IMAGES, out / CONDITIONING):
        for file in folder.rglob("*") if folder.is_dir() else []:
            if file.is_file() and file.relative_to(out).as_posix() not in listed:
                file.unlink()


def copy_file(source: Path, target: Path) -> None:
    """Copy under a hidden name, then rename: a file is whole or absent. The copy takes
    the source's modification time, so one already there with the same size and time (an
    earlier, stopped run) is kept, and a source changed since (even to the same size) is
    copied again."""
    if _same_file(source, target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, staging)
    status = source.stat()
    os.utime(staging, ns=(status.st_atime_ns, status.st_mtime_ns))
    os.replace(staging, target)


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows it (no second copy of the bytes), else a
    copy; one already there is kept only while it is the source's (copy_file)."""
    if _same_file(source, target):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    staging.unlink(missing_ok=True)
    try:
        os.link(source, staging)
    except OSError:
        copy_file(source, target)
        return
    os.replace(staging, target)


def _same_file(source: Path, target: Path) -> bool:
    """`target` is a link to `source`, or a copy of it (same size and modification time)."""
    if not target.is_file():
        return False
    a, b = source.stat(), target.stat()
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def write_webdataset(rows: list[Row], out: Path, shard_size: int) -> list[Path]:
    """Shards of `shard_size` samples. Every image keeps its bytes and suffix when all
    share one suffix; mixed suffixes would make mixed columns, so then all are PNG."""
    suffixes = {_suffix(r.image) for r in rows} | {_suffix(r.conditioning) for r in rows if r.conditioning}
    as_png = len(suffixes) > 1
    shards = []
    for start in range(0, len(rows), shard_size):
        path = out / f"shard-{start // shard_size:05d}.tar"
        staging = path.with_name(f".{path.name}.partial")
        with TarWriter(staging) as archive:
            for index, row in enumerate(rows[start:start + shard_size], start=start):
                key = f"{index:08d}"
                archive.add_image(key, row.image, as_png)
                if row.conditioning is not None:
                    archive.add_image(f"{key}.conditioning", row.conditioning, as_png)
                if row.caption is not None:
                    archive.add(f"{key}.txt", row.caption.encode())
        os.replace(staging, path)
        shards.append(path)
    for stale in {*out.glob("shard-*.tar"), *out.glob(".shard-*.tar.partial")} - set(shards):
        stale.unlink()  # an earlier run's shards past this run's last (fewer rows now)
    return shards


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return "jpg" if suffix == "jpeg" else suffix


class TarWriter:
    """A tar file of in-memory members (webdataset's layout: KEY.COLUMN)."""

    def __init__(self, path: Path) -> None:
        self.archive = tarfile.open(path, "w")  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.archive.close()

    def add(self, name: str, data: bytes) -> None:
        member = tarfile.TarInfo(name)
        member.size = len(data)
        self.archive.addfile(member, io.BytesIO(data))

    def add_image(self, key: str, path: Path, as_png: bool) -> None:
        if not as_png:
            self.add(f"{key}.{_suffix(path)}", path.read_bytes())
            return
        from PIL import Image

        from difftune.data.images import upright

        buffer = io.BytesIO()
        with Image.open(path) as image:
            # Turned as its EXIF says before the PNG is made: PNG keeps no EXIF here, and
            # the conditioning image (drawn for the upright photo) must match it.
            upright(image).save(buffer, format="PNG")
        self.add(f"{key}.png", buffer.getvalue())


def hf_dataset(rows: list[Row]) -> Any:
    """image, conditioning_image (when any row has one) and text columns, the images
    stored as their files' bytes."""
    import datasets

    columns: dict[str, list] = {"image": [{"bytes": r.image.read_bytes(), "path": r.name} for r in rows]}
    features = {"image": datasets.Image()}
    if any(r.conditioning is not None for r in rows):
        columns["conditioning_image"] = [{"bytes": r.conditioning.read_bytes(), "path": r.conditioning.name}
                                         if r.conditioning else None for r in rows]
        features["conditioning_image"] = datasets.Image()
    if any(r.caption is not None for r in rows):
        columns["text"] = [r.caption or "" for r in rows]
        features["text"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
