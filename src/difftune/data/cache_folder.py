"""`difftune cache list | clear`: what the encoded cache (data.cache_latents /
cache_text) holds on disk, and removing it.

The cache folder (data.encoded_cache_dir, default ~/.cache/difftune/encoded) holds one
folder per context: latents/HASH (one VAE, resolution, crop and flip setting) and
text/HASH (one set of text encoders and tokenizers), each with its shards and an
index.json. Only such folders are ever removed, and only when recognisably difftune's
(cache_manifest.why_not_a_context): anything else (a user's file, another tool's folder,
a symbolic link) is left alone and said. A context a live run holds (its lock, see
cache_store.py) is skipped, with a line that says so.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.data.cache_manifest import (
    INDEX,
    IN_USE,
    REMOVING,
    in_use,
    lock_alone,
    read_manifest,
    why_not_a_context,
)
from difftune.errors import InputError

KINDS = ("latents", "text")


@dataclass(frozen=True)
class Context:
    kind: str
    path: Path
    entries: int
    bytes: int
    last_used: float
    """When a run last used it (its lock file's time) or added to it (its index's)."""


@dataclass
class Survey:
    contexts: list[Context] = field(default_factory=list)
    strangers: list[str] = field(default_factory=list)
    """A line per thing in the cache folder that is not a difftune context: left alone."""


def survey(folder: Path) -> Survey:
    """The contexts in the cache folder, and what else is there (never followed into)."""
    found = Survey()
    if not folder.is_dir():
        return found
    for item in sorted(folder.iterdir()):
        if item.name not in KINDS:
            found.strangers.append(f"{item.name} (difftune keeps only latents/ and text/ here)")
        elif item.is_symlink() or not item.is_dir():
            found.strangers.append(f"{item.name} (a symbolic link or a file, never followed)")
        else:
            for path in sorted(item.iterdir()):
                leftover = bool(REMOVING.fullmatch(path.name))  # a clear that stopped: the next one finishes it
                problem = why_not_a_context(path, leftover)
                if problem is not None:
                    found.strangers.append(f"{item.name}/{path.name} ({problem})")
                elif not leftover:
                    found.contexts.append(_context(item.name, path))
    return found


def contexts(folder: Path) -> list[Context]:
    return survey(folder).contexts


def _context(kind: str, path: Path) -> Context:
    files = [os.lstat(item) for item in path.iterdir()]  # plain files only (why_not_a_context)
    times = [os.lstat(path / name).st_mtime for name in (INDEX, IN_USE) if (path / name).is_file()]
    return Context(kind, path, len(read_manifest(path).entries), sum(f.st_size for f in files), max(times))


def describe(folder: Path, found: Survey) -> str:
    if not found.contexts:
        lines = [f"{folder}: no cached latents or embeddings"]
    else:
        total = sum(c.bytes for c in found.contexts) / 2**20
        lines = [f"{folder}: {len(found.contexts)} context(s), {total:.1f} MB"]
    now = time.time()
    for c in found.contexts:
        days = (now - c.last_used) / 86400
        lines.append(f"  {c.kind:<8} {c.path.name}  {c.entries:>7} entries  {c.bytes / 2**20:>9.1f} MB  "
                     f"last used {days:.1f} day(s) ago" + ("  (in use by a run)" if in_use(c.path) else ""))
    lines += [f"  not difftune's, left alone: {line}" for line in found.strangers]
    return "\n".join(lines)


@dataclass
class Cleared:
    removed: list[Context] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """A line per context kept (in use, or not removable) and per thing left alone."""


def clear(folder: Path, older_than_days: float | None = None) -> Cleared:
    """Remove every context (or those unused for longer than the given days) that no run
    holds; what is kept is said in `notes`."""
    if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
        raise InputError(f"--older-than {older_than_days}: give a finite number of days, 0 or more")
    found = survey(folder)
    cutoff = time.time() - (older_than_days or 0) * 86400
    done = Cleared(notes=[f"not difftune's, left alone: {line}" for line in found.strangers])
    for context in found.contexts:
        if older_than_days is not None and context.last_used >= cutoff:
            continue
        kept = _remove(context.path)
        if kept is None:
            done.removed.append(context)
        else:
            done.notes.append(f"kept {context.kind}/{context.path.name}: {kept}")
    for kind in KINDS:
        _finish_removals(folder / kind)
    return done


def _remove(path: Path) -> str | None:
    """Remove a context unless a run holds it; None when removed, else why it was kept."""
    try:
        lock = lock_alone(path)
    except OSError as error:
        return f"its lock cannot be taken ({error.strerror or error})"
    if lock is None:
        return "a running training holds it (its lock is taken); run clear again once it ends"
    try:
        return remove_locked(path)
    finally:
        os.close(lock)


def remove_locked(path: Path) -> str | None:
    """Remove a context whose lock this process holds alone. It is checked again (it may
    have changed since the survey), then renamed out of the way first: a run that starts
    meanwhile waits for the lock, then finds the name free and makes the context anew."""
    problem = why_not_a_context(path)
    if problem is not None:
        return f"not difftune's, left alone ({problem})"
    try:
        doomed = path.with_name(f".removing-{path.name}-{uuid.uuid4().hex[:8]}")
        os.rename(path, doomed)
        _remove_own_files(doomed)
    except OSError as error:
        return f"it could not be removed ({error.strerror or error})"
    return None


def _finish_removals(kind_folder: Path) -> None:
    """Contexts a clear renamed but did not finish removing (it was stopped)."""
    if kind_folder.is_symlink() or not kind_folder.is_dir():
        return
    for path in kind_folder.iterdir():
        if REMOVING.fullmatch(path.name) and why_not_a_context(path, leftover=True) is None:
            _remove_own_files(path)


def _remove_own_files(path: Path) -> None:
    """The files of a context that why_not_a_context accepted (plain files of the cache's
    own names, no folder, no link), then the folder: nothing else can be in it."""
    for item in path.iterdir():
        item.unlink()
    path.rmdir()


def cmd_cache(args: argparse.Namespace) -> int:
    folder = cache_folder(args.dir)
    try:
        if args.cache_verb == "list":
            print(describe(folder, survey(folder)), file=sys.stderr)
            return 0
        done = clear(folder, args.older_than)
    except PermissionError as error:  # a folder this user cannot read: a sentence, not a traceback
        raise InputError(f"cache folder {folder}: {error.filename} cannot be read ({error.strerror})") from None
    freed = sum(c.bytes for c in done.removed) / 2**20
    print("\n".join([f"removed {len(done.removed)} context(s) from {folder}, {freed:.1f} MB", *done.notes]),
          file=sys.stderr)
    return 0


def cache_folder(given: str | None) -> Path:
    """The folder --dir names (or the default), refused where it cannot be a cache folder:
    a file, or under one. A --dir that does not exist is refused too (a typo would read as
    an empty cache, and clear would say it removed nothing); the default may not exist yet."""
    from difftune.paths import default_cache_dir

    folder = Path(given).expanduser() if given else default_cache_dir()
    named = f"--dir {folder}" if given else f"the cache folder {folder} (data.encoded_cache_dir's default)"
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        what = "a file" if existing.is_file() else "something other than a folder"
        where = "" if existing == folder else f"{existing}, above it, "
        raise InputError(f"{named}: {where}is {what}, not a folder; name the cache folder "
                         "(data.encoded_cache_dir)")
    if existing != folder and given:
        raise InputError(f"{named} does not exist; name the cache folder (data.encoded_cache_dir), "
                         f"by default {default_cache_dir()}")
    return folder


def add_cache_verb(verbs: Any) -> None:
    cache = verbs.add_parser("cache", help="list or clear the encoded cache (cached latents and text embeddings)")
    actions = cache.add_subparsers(dest="cache_verb", required=True)
    for name, text in (("list", "each cached context: its entries, size and last use"),
                       ("clear", "remove cached contexts (all, or those unused for --older-than days); "
                                 "a context a running training holds is kept")):
        action = actions.add_parser(name, help=text)
        action.add_argument("--dir", help="the cache folder (default: data.encoded_cache_dir's default, "
                                          "~/.cache/difftune/encoded or $DIFFTUNE_CACHE/encoded)")
        if name == "clear":
            action.add_argument("--older-than", type=float, metavar="DAYS", help="only contexts unused this long")
        action.set_defaults(run=cmd_cache)
