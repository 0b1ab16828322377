"""One context of the encoded cache on disk: entries (a few named tensors each) in
append-only safetensors shards, found and checked through index.json (cache_manifest.py).

The cache is a cache: never trusted. Each shard's checksum is recorded in the index when
the shard is complete, and checked the first time a process opens it (once per shard,
not per row; DataLoader workers inherit what their process checked). A shard that is
missing, longer or shorter than recorded, damaged or unchecked is said in one line, and
its entries are encoded again; so is every entry of an index written for another context
(cache_manifest.py). Nothing in it is unpickled; no name in the index leads out of its
folder, and no file in it that is not a plain file (a named pipe) is opened.

A CacheStore holds the context's lock (shared) from its creation to `close`: while a run
uses the context, `difftune cache clear` leaves it alone.
"""

from __future__ import annotations

import fcntl
import os
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difftune.data.cache_manifest import (
    WRITE_LOCK,
    hold_context,
    open_own_file,
    read_manifest,
    shard_checksum,
    shard_problem,
    write_manifest,
)
from difftune.files import apply_umask

SHARD_ENTRIES = 256


_HOLDING: weakref.WeakSet[CacheStore] = weakref.WeakSet()


def _let_go_in_child() -> None:
    """A forked child (a DataLoader worker) inherits the lock's descriptor, and a flock
    lasts while any copy is open: closing the child's copies (not unlocking: that would
    end the parent's lock too) leaves the lock to end when the run closes its dataset."""
    for store in list(_HOLDING):
        if store._hold is not None:
            os.close(store._hold)
            store._hold = None


os.register_at_fork(after_in_child=_let_go_in_child)


class DamagedShard(RuntimeError):
    """A shard failed its check after the cache was built (it changed during the run)."""


class CacheStore:
    """Entries in shards, found through index.json: {key: shard file name}."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # first: what close needs, so that an __init__ that fails below closes cleanly
        self._handles: dict[str, Any] = {}  # opened lazily, per process (DataLoader workers)
        self._hold: int | None = None
        self._hold = hold_context(folder)  # before reading: `cache clear` waits for no reader
        _HOLDING.add(self)
        try:
            manifest = read_manifest(folder)
        except BaseException:
            self.close()  # not left to __del__: the traceback keeps this store (and the lock) alive
            raise
        self.index, self.sums, self.problems = manifest.entries, manifest.sums, manifest.problems
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._checked: set[str] = set()  # shards whose checksum matched in this process (or its parent)
        # shards found damaged (or named only by another context's index): left out of the
        # next index written, then removed
        self._damaged: set[str] = set(manifest.strays)

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self._pending

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        # clone: rows of one batch share storage, which safetensors refuses to save
        self._pending[key] = {name: t.detach().cpu().clone(memory_format=torch.contiguous_format)
                              for name, t in tensors.items()}
        if len(self._pending) >= SHARD_ENTRIES:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one new shard, checksum it once complete, then add
        it to the index. Several runs may share a cache: temporary names are this writer's
        own, and the index is re-read and merged under a lock, so no run's entries are lost."""
        if not self._pending:
            return
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        flat = {f"{key}/{field}": t for key, entry in self._pending.items() for field, t in entry.items()}
        partial = self.folder / f".{name}.partial"
        save_file(flat, partial)
        apply_umask(partial)  # the cache is shared: not safetensors' private 0600
        checksum = shard_checksum(partial)  # of the bytes on disk, read back
        os.replace(partial, self.folder / name)
        with os.fdopen(open_own_file(self.folder / WRITE_LOCK, os.O_WRONLY | os.O_CREAT), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = read_manifest(self.folder)
            merged.entries = {key: shard for key, shard in merged.entries.items() if shard not in self._damaged}
            merged.entries.update(dict.fromkeys(self._pending, name))
            merged.sums[name] = checksum
            write_manifest(self.folder, merged, token)
            self._remove_damaged()
        self.index, self.sums = merged.entries, merged.sums
        self._checked.add(name)
        self._pending.clear()

    def _remove_damaged(self) -> None:
        """Damaged shards, once no index names them (a reader that opened one keeps its
        own copy until it closes it)."""
        for shard in self._damaged:
            (self.folder / shard).unlink(missing_ok=True)
        self._damaged.clear()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        handle, fields = self._open(self.index[key])
        return {name.split("/", 1)[1]: handle.get_tensor(name) for name in fields[key]}

    def _open(self, shard: str) -> tuple[Any, dict[str, list[str]]]:
        """A shard's handle and its tensor names by entry key, checked and read once per
        process (so a lookup on the training hot path does not scan the shard's names)."""
        if shard not in self._handles:
            problem = self._check(shard)
            if problem is not None:
                raise DamagedShard(f"cache {self.folder}: {shard} {problem}; run again to encode it again")
            handle = safe_open(str(self.folder / shard), framework="pt")
            fields: dict[str, list[str]] = {}
            for name in handle.keys():
                fields.setdefault(name.split("/", 1)[0], []).append(name)
            self._handles[shard] = (handle, fields)
        return self._handles[shard]

    def _check(self, shard: str) -> str | None:
        """What is wrong with the shard, or None; a sound shard is read through once."""
        if shard in self._checked:
            return None
        problem = shard_problem(self.folder, shard, self.sums.get(shard))
        if problem is None:
            self._checked.add(shard)
        return problem

    def drop_damaged(self, keys: Iterable[str]) -> list[str]:
        """Check the shards that hold these keys; forget the entries of each one that is
        missing, truncated, unchecked or fails its checksum, and of keys a shard lacks:
        they are encoded again. Returns the index's problems and a sentence per bad shard."""
        problems, self.problems = self.problems, []
        by_shard: dict[str, list[str]] = {}
        for key, shard in self.index.items():
            by_shard.setdefault(shard, []).append(key)
        for shard in sorted({self.index[key] for key in set(keys) if key in self.index}):
            held = by_shard[shard]
            problem = self._check(shard)
            if problem is None:
                try:
                    lacking = [key for key in held if key not in self._open(shard)[1]]
                except Exception as error:  # noqa: BLE001 (safetensors raises several kinds for a bad file)
                    problem = f"is unreadable ({type(error).__name__})"
            if problem is not None:
                problems.append(f"{shard} {problem}; its {len(held)} entries are encoded again")
                self._damaged.add(shard)
                lacking = held
            elif lacking:
                problems.append(f"{shard} lacks {len(lacking)} entries; they are encoded again")
            for key in lacking:
                del self.index[key]
        return problems

    def reload(self) -> None:
        """Read the index again (other processes have added to it); checks already made stand."""
        manifest = read_manifest(self.folder)
        self.index, self.sums = manifest.entries, manifest.sums

    def close(self) -> None:
        """Let the context go: `cache clear` may remove it from now on."""
        self._handles.clear()
        if self._hold is not None:
            os.close(self._hold)
            self._hold = None

    def __del__(self) -> None:
        if "_hold" in self.__dict__:  # not when __init__ failed before its first line
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        # safetensors handles do not pickle; each DataLoader worker opens its own. The lock
        # stays with the process that made the store (a worker lives within its run).
        return {**self.__dict__, "_handles": {}, "_hold": None}
