"""Webdataset .tar shards for a stream (data.streaming), read here rather than by datasets'
"webdataset" builder: its tarfile loop ends a truncated or damaged shard without a word
(the rest of the shard silently lost), and a file that is not a tar, or a caption that is
not UTF-8, raises from inside datasets without naming the shard.

datasets still makes the stream (IterableDataset.from_generator over the list of shards:
split among processes and shuffled by shard, as before); each shard is read in order and
every problem becomes a row naming the shard and the member (PROBLEM). The stream stops
on such a row, or with data.on_bad = "skip" passes over it (data.streaming); the samples
read before it are kept.

- The shards are the folder's files named *.tar, *.tar.gz or *.tgz (tarfile reads the
  gzipped ones; their damage is named the same way). A name among them that is not a
  regular file, or a link to a file outside the folder, stops the run when the stream
  is opened, before any model loads (SHARD_SUFFIXES, list_shards).
- A sample is the members that share a key, webdataset's rule: the name up to the first
  dot of its last part ("000003.conditioning.png": key "000003", field
  "conditioning.png"). Names starting with "." or "__" are passed over, as datasets does.
- A sample's members are consecutive (webdataset writes them so, and reads a shard in
  one pass). A shard where a key comes back after another is refused whole, naming the
  key, before any of its samples is read: read in order, it would give each part as a
  sample of its own, and one would be said to lack the member another part holds. The
  check reads headers only (a gzipped shard is decompressed once more for it).
- Members are read, never extracted, so a member's name reaches no folder; links,
  folders and devices are passed over; a member larger than MAX_MEMBER_BYTES is not read.
- Values stay bytes: the stream decodes only what it trains on (images, the caption).
- An edit's sample holds one reference as the member its column names
  (KEY.reference.png) or several as numbered members of that name (KEY.reference.0.png,
  KEY.reference.1.png, ...), read as a list in their numbers' order (reference_cell).
- A whole archive ends with tar's end-of-archive block; tarfile stops quietly at a
  missing or damaged header, so an archive without that block is reported truncated.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from difftune.data.sources import regular_file_problem
from difftune.errors import DataError

KEY, SHARD, PROBLEM = "__key__", "__url__", "__problem__"
"""A row's sample key and shard (the names datasets' builder uses), and what is wrong
with it (only on a row that cannot be trained on)."""

MAX_MEMBER_BYTES = 1 << 31
"""No member is read whole above this (2 GiB): a bigger one is damage, not a sample."""

MAX_SHARD_BYTES = 1 << 50  # no limit in practice: only a file is opened, never a FIFO or a device

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext, as datasets uses it


def list_shards(folder: Path) -> list[str]:
    """The folder's shards, sorted. One that is a link out of the folder, or not a file,
    stops here: found only when the stream reached it, it would stop a run mid-way (or
    a FIFO block it) after the models had loaded."""
    shards = sorted(str(path) for path in folder.iterdir() if path.name.endswith(SHARD_SUFFIXES))
    for shard in map(Path, shards):
        problem = _shard_file_problem(shard, folder)
        if problem:
            raise DataError(f"{shard}: {problem}")
    return shards


def _shard_file_problem(shard: Path, folder: Path) -> str | None:
    """Why a shard's path is refused: a link whose target is outside the folder (data is
    hostile input; a link inside it, or a linked data.path, is fine), or not a file."""
    target = os.path.realpath(shard)
    if shard.is_symlink() and not target.startswith(os.path.realpath(folder) + os.sep):
        return f"a link to {target}, outside data.path; copy the shard into the folder (a link must stay inside it)"
    problem = regular_file_problem(shard, limit=MAX_SHARD_BYTES)
    if problem:
        return f"{problem}; every *.tar, *.tar.gz and *.tgz in data.path is read as a shard, so it must be a file"
    return None


def stream_of_shards(shards: list[str]) -> datasets.IterableDataset:
    """The shards as one stream of samples, sharded by file for datasets."""
    return datasets.IterableDataset.from_generator(shard_rows, gen_kwargs={"shards": shards})


def shard_rows(shards: list[str]) -> Iterator[dict[str, Any]]:
    """Every sample of the shards, in order (the generator datasets runs)."""
    for shard in shards:
        yield from read_shard(Path(shard))


def numbered_members(sample: dict[str, Any], column: str) -> list[str]:
    """A webdataset sample's numbered members of `column` ("reference.png": "reference.0.png",
    "reference.1.png", ...), in their numbers' order; none for a row of another source."""
    if not sample.get(SHARD):
        return []
    stem, dot, suffix = column.rpartition(".")
    numbered = re.compile(rf"{re.escape(stem)}\.(\d+)\.{re.escape(suffix)}" if dot else rf"{re.escape(column)}\.(\d+)")
    found = [(int(match.group(1)), name) for name in sample
             if sample[name] is not None and (match := numbered.fullmatch(name))]
    return [name for _, name in sorted(found)]


def has_references(sample: dict[str, Any], column: str) -> bool:
    """Whether the row has references under `column` in either form (never raises)."""
    return sample.get(column) is not None or bool(numbered_members(sample, column))


def reference_cell(sample: dict[str, Any], column: str) -> Any:
    """A row's references under `column`: its cell (one member, "reference.png"), or its
    numbered members as a list (numbered_members); None when it has neither. Both at once
    is refused, naming the sample."""
    names = numbered_members(sample, column)
    if not names:
        return sample.get(column)
    if sample.get(column) is not None:
        key = sample.get(KEY)
        raise DataError(f"{sample.get(SHARD)}, sample {key}: both a member {key}.{column} and numbered ones "
                        f"({', '.join(f'{key}.{name}' for name in names)}): one reference, or several numbered "
                        "from 0, not both")
    return [sample[name] for name in names]


def split_name(name: str) -> tuple[str | None, str]:
    """(key, field) of a member name; key None for a name without an extension."""
    match = _NAME.match(name)
    return (match.group(1), match.group(2)) if match else (None, "")


def read_shard(shard: Path) -> Iterator[dict[str, Any]]:
    """The shard's samples in order. A damaged shard gives the samples before the damage,
    then one row naming the shard and the member where it broke; the sample being read
    then (perhaps incomplete) is dropped with the rest."""
    problem = regular_file_problem(shard, limit=MAX_SHARD_BYTES)  # a FIFO named .tar would block
    if problem:
        yield {KEY: None, SHARD: str(shard), PROBLEM: f"{shard}: {problem}"}
        return
    ungrouped = _ungrouped(shard)
    if ungrouped:
        yield {KEY: ungrouped[0], SHARD: str(shard), PROBLEM: f"{shard}: {ungrouped[1]}"}
        return
    sample: dict[str, Any] = {}
    last = None  # the last member read whole
    try:
        archive = tarfile.open(shard, mode="r:*", tarinfo=_Header)  # noqa: SIM115 (closed below)
    except tarfile.ReadError:  # its message lists every compression tried, one a line
        yield {KEY: None, SHARD: str(shard), PROBLEM: f"{shard}: not a tar archive (nor a gzip, bzip2 or xz one)"}
        return
    except Exception as error:  # noqa: BLE001 (tarfile and the decompressors raise many kinds)
        yield {KEY: None, SHARD: str(shard), PROBLEM: f"{shard}: cannot be opened ({_said(error)})"}
        return
    with archive:
        try:
            for member in _files(archive):
                key, field = split_name(member.name)
                if sample and sample[KEY] != key:
                    yield sample
                    sample = {}
                sample = sample or {KEY: key, SHARD: str(shard)}
                _add(sample, field, member, archive, shard)
                last = member.name
            complete = getattr(archive, "ended", False)
        except _CutShort as cut:
            yield _broken(shard, sample, str(cut))
            return
        except Exception as error:  # noqa: BLE001 (as above)
            yield _broken(shard, sample, f"truncated or damaged {_after(last)} ({_said(error)})")
            return
    if not complete:
        yield _broken(shard, sample, f"truncated: it ends {_after(last)} without tar's end-of-archive block")
    elif sample:
        yield sample


def _files(archive: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's regular files with a key, not hidden; the member list is not kept
    (a shard may hold millions)."""
    while (member := archive.next()) is not None:
        archive.members = []
        name = member.name.rsplit("/", 1)[-1]
        if member.isreg() and not name.startswith((".", "__")) and split_name(member.name)[0] is not None:
            yield member


def _add(sample: dict[str, Any], field: str, member: tarfile.TarInfo, archive: tarfile.TarFile, shard: Path) -> None:
    """The member's bytes into its sample, or why the sample cannot be trained on."""
    if PROBLEM in sample:
        return
    if field in sample:
        sample[PROBLEM] = f"{shard}: sample {sample[KEY]} has two members named {member.name}"
    elif member.size > MAX_MEMBER_BYTES:
        sample[PROBLEM] = (f"{shard}: member {member.name} is {member.size / 2**30:.1f} GiB, more than the "
                           f"{MAX_MEMBER_BYTES / 2**30:.0f} GiB a member may hold")
    else:
        try:
            sample[field] = archive.extractfile(member).read()  # type: ignore[union-attr]
        except Exception as error:  # noqa: BLE001 (a short or damaged member)
            raise _CutShort(f"truncated: member {member.name} is cut short ({_said(error)})") from None


def _ungrouped(shard: Path) -> tuple[str, str] | None:
    """(key, why) when a sample's members are not consecutive in the shard, from its
    headers alone. Damage ends the check quietly: the read names it where it is."""
    seen: set[str | None] = set()
    key = previous = None
    try:
        with tarfile.open(shard, mode="r:*") as archive:
            for member in _files(archive):
                if split_name(member.name)[0] != key:
                    key = split_name(member.name)[0]
                    if key in seen:
                        return key, (f"the members of sample {key} are not consecutive ({member.name} comes after "
                                     f"{previous}); a sample's files must be next to each other in a shard, as "
                                     "webdataset writes them, so this shard is not read")
                    seen.add(key)
                previous = member.name
    except Exception:  # noqa: BLE001, S110 (as in read_shard)
        pass
    return None


class _Header(tarfile.TarInfo):
    """A member header that marks the archive `ended` when it reads tar's end-of-archive
    block: tarfile stops without a word at a missing, cut or damaged header too. Noted
    as it is read, not by seeking back to it (in a gzipped shard that would decompress
    it again from the start)."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.ended = True  # type: ignore[attr-defined]
            raise


class _CutShort(Exception):
    """A member's data ends before its size (the message says which)."""


def _broken(shard: Path, sample: dict[str, Any], what: str) -> dict[str, Any]:
    """The row standing for a shard broken at `sample` (the one being read, if any)."""
    lost = f"sample {sample[KEY]} and the rest of the shard are lost" if sample else "the rest of the shard is lost"
    return {KEY: sample.get(KEY), SHARD: str(shard), PROBLEM: f"{shard}: {what}; {lost}"}


def _after(member: str | None) -> str:
    return f"after member {member}" if member else "before its first member"


def _said(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
