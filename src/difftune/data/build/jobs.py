"""What every dataset-building verb (prepare, condition, caption) shares:

- the output folder's bookkeeping (journal, report, manifest) under a hidden
  `.difftune/` that `datasets` does not read as data (a visible .json beside a few
  images makes it load the folder as JSON rows instead of an imagefolder); which folder
  a job may write is output.py's;
- a journal, one JSON line per finished item, so a stopped job resumes where it stopped;
- a progress line with rate and ETA;
- a pool of worker processes, one per core, for the per-image work.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from difftune.errors import DataError

BOOKKEEPING = ".difftune"
METADATA = "metadata.jsonl"


def bookkeeping(out: Path) -> Path:
    """The folder's .difftune/, made if missing; one that is not a folder (a file, a link
    that leads nowhere) is named, not a FileExistsError."""
    folder = out / BOOKKEEPING
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise DataError(f"{folder} is not a folder (a file, or a link that leads nowhere); difftune keeps its "
                        "bookkeeping there: move it away")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Journal:
    """Finished items, one JSON object per line, appended and flushed as they finish; a
    line cut short by a kill is ignored when the job resumes."""

    def __init__(self, path: Path, identity: dict[str, Any]) -> None:
        """`identity`: the job's settings; a journal written with other settings is set
        aside rather than mixed with this job's results."""
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        header = {"identity": identity}
        if path.is_file():
            lines = path.read_text().splitlines()
            if lines and _parse(lines[0]) == header:
                for line in lines[1:]:
                    entry = _parse(line)
                    if entry is not None and "key" in entry:
                        self.done[entry["key"]] = entry
            else:
                os.replace(path, path.with_suffix(".other-settings.jsonl"))
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(header) + "\n")
        self._handle = open(path, "a")  # noqa: SIM115 (held for the job's lifetime)

    def record(self, key: str, entry: dict[str, Any]) -> None:
        entry = {"key": key, **entry}
        self.done[key] = entry
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def _parse(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class Progress:
    """`verb: 120/1000 (35.2/s, ETA 0:25)` on stderr, at most every `interval` seconds,
    and a last line when done."""

    def __init__(self, verb: str, total: int, already: int = 0, interval: float = 2.0) -> None:
        self.verb, self.total, self.done = verb, total, already
        self.started, self.already, self.interval = time.monotonic(), already, interval
        self.shown = 0.0
        if already:
            print(f"{verb}: resuming, {already} of {total} already done", file=sys.stderr, flush=True)

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.shown >= self.interval or self.done >= self.total:
            self.shown = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.already) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = "?" if left is None else f"{int(left // 60)}:{int(left % 60):02d}"
        return f"{self.verb}: {self.done}/{self.total} ({rate:.1f}/s, ETA {eta})"


def cores() -> int:
    """The cores this process may use (its affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def map_on_cores(work: Callable[[Any], Any], items: Iterable[Any], workers: int | None) -> Iterator[Any]:
    """work(item) for every item, in order, on `workers` processes (every core when None;
    1 runs in this process). The per-image work is pure Python and OpenCV: processes,
    not threads, use more than one core."""
    items = list(items)
    workers = min(workers or cores(), max(len(items), 1))
    if workers <= 1:
        yield from map(work, items)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(work, items, chunksize=max(1, min(32, len(items) // (workers * 8))))


def write_json(path: Path, value: Any) -> None:
    """A whole JSON file, replaced in one step."""
    staging = _staging(path)
    staging.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(staging, path)


def write_metadata(out: Path, rows: list[dict[str, Any]]) -> Path:
    """metadata.jsonl, replaced in one step (a reader never sees half of it)."""
    path = out / METADATA
    staging = _staging(path)
    with open(staging, "w", encoding="utf-8") as handle:
        handle.writelines(_json_line(row) for row in rows)
    os.replace(staging, path)
    return path


def _staging(path: Path) -> Path:
    """The hidden name a whole file is written under, cleared first: a link left there (a
    downloaded dataset's, for `caption`) is replaced, not written through."""
    staging = path.with_name(f".{path.name}.partial")
    staging.unlink(missing_ok=True)
    return staging


def _json_line(row: dict[str, Any]) -> str:
    """One row, its text as UTF-8; a row holding what UTF-8 cannot (a lone surrogate an
    input gave as JSON's "\\udcff") keeps it as that escape, as it came in."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row)
    return line + "\n"
