"""`difftune cache list | clear`: what the encoded cache (data.cache_latents /
cache_text) holds on disk, and removing it.

The cache folder (data.encoded_cache_dir, default ~/.cache/difftune/encoded) holds one
folder per context: latents/HASH (one VAE, resolution, crop and flip setting) and
text/HASH (one set of text encoders and tokenizers), each with its shards and an
index.json. Only such folders are ever removed: a folder without index.json is not
difftune's and is left alone.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from difftune.errors import InputError

KINDS = ("latents", "text")


@dataclass(frozen=True)
class Context:
    kind: str
    path: Path
    entries: int
    bytes: int
    last_used: float
    """The index's modification time: when a run last added to or rebuilt it."""


def contexts(folder: Path) -> list[Context]:
    import json

    found = []
    for kind in KINDS:
        for path in sorted((folder / kind).glob("*")) if (folder / kind).is_dir() else []:
            index = path / "index.json"
            if not index.is_file():
                continue
            try:
                entries = len(json.loads(index.read_text()))
            except (ValueError, OSError):
                entries = 0
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            found.append(Context(kind, path, entries, size, index.stat().st_mtime))
    return found


def describe(folder: Path, found: list[Context]) -> str:
    if not found:
        return f"{folder}: no cached latents or embeddings"
    lines = [f"{folder}: {len(found)} context(s), {sum(c.bytes for c in found) / 2**20:.1f} MB"]
    now = time.time()
    for c in found:
        days = (now - c.last_used) / 86400
        lines.append(f"  {c.kind:<8} {c.path.name}  {c.entries:>7} entries  {c.bytes / 2**20:>9.1f} MB  "
                     f"last used {days:.1f} day(s) ago")
    return "\n".join(lines)


def clear(folder: Path, older_than_days: float | None = None) -> list[Context]:
    """Remove every context (or those unused for longer than the given days); returns them."""
    if older_than_days is not None and older_than_days < 0:
        raise InputError(f"--older-than {older_than_days}: give a number of days, 0 or more")
    cutoff = time.time() - (older_than_days or 0) * 86400
    removed = [c for c in contexts(folder) if older_than_days is None or c.last_used < cutoff]
    for context in removed:
        shutil.rmtree(context.path)
    return removed
