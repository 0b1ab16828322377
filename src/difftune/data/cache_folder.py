"""`difftune cache list | clear`: what the encoded cache (data.cache_latents /
cache_text) holds on disk, and removing it.

The cache folder (data.encoded_cache_dir, default ~/.cache/difftune/encoded) holds one
folder per context: latents/HASH (one VAE, resolution, crop and flip setting) and
text/HASH (one set of text encoders and tokenizers), each with its shards and an
index.json. Only such folders are ever removed: a folder without index.json is not
difftune's and is left alone.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def cmd_cache(args: argparse.Namespace) -> int:
    from difftune.paths import default_cache_dir

    folder = Path(args.dir).expanduser() if args.dir else default_cache_dir()
    if args.cache_verb == "list":
        print(describe(folder, contexts(folder)), file=sys.stderr)
        return 0
    removed = clear(folder, args.older_than)
    freed = sum(c.bytes for c in removed) / 2**20
    print(f"removed {len(removed)} context(s) from {folder}, {freed:.1f} MB", file=sys.stderr)
    return 0


def add_cache_verb(verbs: Any) -> None:
    cache = verbs.add_parser("cache", help="list or clear the encoded cache (cached latents and text embeddings)")
    actions = cache.add_subparsers(dest="cache_verb", required=True)
    for name, text in (("list", "each cached context: its entries, size and last use"),
                       ("clear", "remove cached contexts (all, or those unused for --older-than days)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--dir", help="the cache folder (default: data.encoded_cache_dir's default, "
                                          "~/.cache/difftune/encoded or $DIFFTUNE_CACHE/encoded)")
        if name == "clear":
            action.add_argument("--older-than", type=float, metavar="DAYS", help="only contexts unused this long")
        action.set_defaults(run=cmd_cache)
