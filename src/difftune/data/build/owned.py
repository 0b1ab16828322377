"""What a dataset-building job wrote into its OUT, so that a later run can tell it from
what the user put there since.

A second run into OUT replaces difftune's output there (whole, or file by file when it
resumes), and files it did not write would go with it without a word: notes, a caption
fixed by hand, an image added to images/. So a run that completes records every file and
folder of OUT (its .difftune/ bookkeeping aside) with size and modification time, and a
later run compares before it changes anything: anything added, or changed since, is
named and the run refused (output.py).

An OUT without a record (a run was stopped before it completed, or an older difftune
wrote it) is taken as it was: it holds what a difftune run was writing. A run that works
in OUT itself (a resumed one) drops the record before it starts changing files, and
writes a new one when it completes.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any

from difftune.data.build.jobs import BOOKKEEPING, bookkeeping, write_json

RECORD = "written-files.json"
RECORD_VERSION = 1
DATASETS_CACHES = "cache-*.arrow"
"""What `datasets` writes beside a saved dataset (state.json) when it is loaded and
shuffled or mapped: derived from difftune's files, remade on demand, never the user's."""


def record_written(folder: Path) -> None:
    """Record every file and folder now in `folder` as difftune's."""
    write_json(bookkeeping(folder) / RECORD, {"version": RECORD_VERSION, "entries": _entries(folder)})


def forget_written(folder: Path) -> None:
    """Drop the record: the run about to change `folder` in place leaves it as a stopped
    run's until it completes (and records it again)."""
    (folder / BOOKKEEPING / RECORD).unlink(missing_ok=True)


def not_written(folder: Path) -> tuple[str, str] | None:
    """(relative name, "added" or "changed") of the first entry of `folder` difftune did
    not write, or changed since; None when every one is as recorded, or with no record."""
    recorded = _record(folder)
    if recorded is None:
        return None
    for name, entry in sorted(_entries(folder).items()):
        if name not in recorded:
            if not _datasets_cache(folder, name):
                return name, "added"
        elif entry != recorded[name] and not _same_linked_file(folder / name, entry, recorded[name]):
            return name, "changed"
    return None


def _record(folder: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((folder / BOOKKEEPING / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no record (or a damaged one: as if none, like a stopped run's OUT)
    entries = found.get("entries") if isinstance(found, dict) and found.get("version") == RECORD_VERSION else None
    return entries if isinstance(entries, dict) else None


def _entries(folder: Path) -> dict[str, list]:
    """relative name -> ["folder"], ["link", target] or ["file", size, mtime_ns, inode],
    links not followed (a link's target is not OUT's to list)."""
    entries: dict[str, list] = {}
    for parent, folders, files in os.walk(folder):
        here = Path(parent)
        if here == folder:
            folders[:] = [name for name in folders if name != BOOKKEEPING]
        for name in folders + files:
            path = here / name
            entries[path.relative_to(folder).as_posix()] = _entry(path)
    return entries


def _entry(path: Path) -> list:
    if path.is_symlink():
        return ["link", os.readlink(path)]
    if path.is_dir():
        return ["folder"]
    status = path.stat()
    return ["file", status.st_size, status.st_mtime_ns, status.st_ino]


def _same_linked_file(path: Path, entry: list, recorded: list) -> bool:
    """A file `condition` hard-linked from its IN, changed there: still the very file
    difftune linked (same inode, more than one name), and nothing of the user's is lost
    when OUT's name for it goes."""
    try:
        links = path.stat().st_nlink
    except OSError:
        return False
    return entry[0] == recorded[0] == "file" and entry[3] == recorded[3] and links > 1


def _datasets_cache(folder: Path, name: str) -> bool:
    return "/" not in name and fnmatch.fnmatch(name, DATASETS_CACHES) and (folder / "state.json").is_file()
