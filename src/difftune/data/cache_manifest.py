"""The encoded cache's own files, trusted for nothing: its index (index.json, which also
marks a folder as a difftune context), its shard names and checksums, and the lock a run
holds on a context while it uses it.

A context folder holds only these names, all plain files:
- index.json: {"format": FORMAT, "version": 4, "context": the folder's name,
  "entries": {key: shard}, "shards": {shard: {"bytes": size, "crc32": checksum}}},
  replaced atomically. "context" ties it to its folder: the folder's name is the hash of
  everything that shapes the entries (cache.py), so another context's index and shards
  copied here (sound checksums, wrong shapes) are not read as this one's;
- shard-<32 hex>.safetensors, and the hidden .partial files of a writer at work;
- .lock (writers merging the index, one at a time) and .in-use (runs using the context).

Everything read here is checked: a name that is not a shard name (a path, "..") is never
opened, a symbolic link is never followed, a file that is not a plain file (a named pipe,
whose open or read would wait forever) is never read, a malformed record is dropped with
a sentence that says what happens instead. This module imports only the standard library, so
`difftune cache list` does not import torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.errors import UserError
from difftune.files import crc32

FORMAT = "difftune encoded cache"
VERSION = 4  # 3 had no "context"
INDEX = "index.json"
WRITE_LOCK = ".lock"
IN_USE = ".in-use"
HEX32 = re.compile(r"[0-9a-f]{32}")
SHARD_NAME = re.compile(r"shard-[0-9a-f]{32}\.safetensors")
REMOVING = re.compile(r"\.removing-[0-9a-f]{32}-[0-9a-f]{8}")
_OWN_NAMES = re.compile(r"index\.json|\.lock|\.in-use|shard-[0-9a-f]{32}\.safetensors"
                        r"|\.shard-[0-9a-f]{32}\.safetensors\.partial|\.index\.json\.[\w-]+\.partial")


@dataclass
class Manifest:
    entries: dict[str, str] = field(default_factory=dict)
    """{entry key: shard name}: only well-formed keys and shard names."""
    sums: dict[str, dict[str, Any]] = field(default_factory=dict)
    """{shard name: {"bytes": size, "crc32": checksum}}, recorded when the shard was complete."""
    problems: list[str] = field(default_factory=list)
    """A sentence per thing that was dropped, saying that it is encoded again."""
    ours: bool = False
    """The index says it is a difftune cache index (this format, or version 2's {key: shard})."""
    unreadable: bool = False
    """index.json is there but does not parse (a damaged context, or not a cache at all)."""
    strays: set[str] = field(default_factory=set)
    """Shards named by an index that was not this context's: removed once a new index is written."""


def read_manifest(folder: Path) -> Manifest:
    """The context's index; a missing one is empty, a damaged one is empty with a sentence."""
    path = folder / INDEX
    try:  # O_NONBLOCK: opening a named pipe would otherwise wait for a writer forever
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return Manifest()
    except OSError as error:  # ELOOP: a symbolic link, never followed
        return Manifest(problems=[f"{INDEX} cannot be read ({_reason(error)}); every entry is encoded again"])
    try:
        with os.fdopen(fd, "rb") as handle:
            kind = _not_plain(os.fstat(fd).st_mode)
            if kind is not None:
                return Manifest(problems=[f"{INDEX} is not a plain file ({kind}); every entry is encoded again"])
            raw = json.loads(handle.read())
    except (ValueError, OSError) as error:
        return Manifest(problems=[f"{INDEX} is unreadable ({type(error).__name__}); every entry is encoded again"],
                        unreadable=True)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        manifest = Manifest(ours=True)
        if raw.get("context") != folder.name:
            return _not_this_contexts(manifest, raw)
        entries, sums = raw.get("entries"), raw.get("shards")
        _add_entries(manifest, entries if isinstance(entries, dict) else {})
        _add_sums(manifest, sums if isinstance(sums, dict) else {})
        return manifest
    if isinstance(raw, dict) and raw and all(isinstance(v, str) and SHARD_NAME.fullmatch(v) for v in raw.values()):
        # version 2 wrote {key: shard} without checksums: read so that `cache clear` knows
        # it; its shards have no checksum, so they count as damaged and are encoded again
        manifest = Manifest(ours=True)
        _add_entries(manifest, raw)
        return manifest
    return Manifest(problems=[f"{INDEX} is not a difftune cache index; every entry is encoded again"])


def _not_plain(mode: int) -> str | None:
    """What a file that is not a plain file is, in words (None: a plain file)."""
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISDIR, "a folder"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "not a file difftune writes")


def _not_this_contexts(manifest: Manifest, raw: dict[str, Any]) -> Manifest:
    """An index without this folder's name: its entries may have any shape (another VAE,
    resolution or flip setting with the same entry keys), so none is read. Its shards
    are left for the next index written to remove."""
    stamp = raw.get("context")
    if stamp is None:
        manifest.problems.append(f"{INDEX} does not name its context (written before difftune named it, "
                                 "or edited); every entry is encoded again")
    else:
        manifest.problems.append(f"{INDEX} was written for another context ({str(stamp)[:40]!r}, not this "
                                 "folder's name: copied here?); every entry is encoded again")
    entries = raw.get("entries")
    shards = entries.values() if isinstance(entries, dict) else ()
    manifest.strays = {shard for shard in shards if isinstance(shard, str) and SHARD_NAME.fullmatch(shard)}
    return manifest


def _add_entries(manifest: Manifest, entries: dict[Any, Any]) -> None:
    bad = [key for key, shard in entries.items()
           if not (isinstance(key, str) and HEX32.fullmatch(key) and isinstance(shard, str)
                   and SHARD_NAME.fullmatch(shard))]
    manifest.entries = {key: shard for key, shard in entries.items() if key not in bad}
    if bad:
        example = str(entries[bad[0]])[:80]
        manifest.problems.append(f"{INDEX} has {len(bad)} entries that name no shard of this folder "
                                 f"(such as {example!r}); they are encoded again")


def _add_sums(manifest: Manifest, sums: dict[Any, Any]) -> None:
    for shard, record in sums.items():
        if (isinstance(shard, str) and SHARD_NAME.fullmatch(shard) and isinstance(record, dict)
                and type(record.get("bytes")) is int and record["bytes"] >= 0
                and isinstance(record.get("crc32"), str) and re.fullmatch(r"[0-9a-f]{8}", record["crc32"])):
            manifest.sums[shard] = {"bytes": record["bytes"], "crc32": record["crc32"]}
    # a malformed record is left out: its shard then has no checksum and is encoded again


def write_manifest(folder: Path, manifest: Manifest, token: str) -> None:
    """Replace index.json in one step (a reader sees the old index or the new one).
    Only checksums of shards that entries name are kept."""
    used = set(manifest.entries.values())
    body = {"format": FORMAT, "version": VERSION, "context": folder.name, "entries": manifest.entries,
            "shards": {shard: record for shard, record in manifest.sums.items() if shard in used}}
    partial = folder / f".{INDEX}.{token}.partial"
    partial.write_text(json.dumps(body))
    os.replace(partial, folder / INDEX)


def shard_checksum(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "crc32": crc32(path)}


def shard_problem(folder: Path, shard: str, recorded: dict[str, Any] | None) -> str | None:
    """What is wrong with a shard file against its recorded checksum, or None when it is
    sound. Reads the whole file (the caller does this once per shard per process)."""
    if recorded is None:
        return "has no checksum in index.json (written before difftune checked its cache, or the index was edited)"
    path = folder / shard
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "is missing"
    if not stat.S_ISREG(info.st_mode):
        return "is not a plain file (a symbolic link is never followed)"
    if info.st_size != recorded["bytes"]:
        change = "longer" if info.st_size > recorded["bytes"] else "shorter"
        return (f"is {abs(info.st_size - recorded['bytes'])} bytes {change} than index.json records "
                f"({info.st_size}, not {recorded['bytes']})")
    if crc32(path) != recorded["crc32"]:
        return "has the size index.json records, but its checksum differs (its bytes changed)"
    return None


def why_not_a_context(path: Path, leftover: bool = False) -> str | None:
    """Why a folder is not recognisably one difftune context (None: it is). Only such a
    folder is ever removed: a user's file inside, a link or a subfolder leaves it alone.
    leftover: a context that `cache clear` was removing when it stopped (no index needed)."""
    if path.is_symlink():
        return "a symbolic link (never followed)"
    if not path.is_dir():
        return "not a folder"
    if not (REMOVING if leftover else HEX32).fullmatch(path.name):
        return "not named as a difftune context"
    for item in path.iterdir():
        if item.is_symlink() or not item.is_file():
            return f"it holds {item.name!r}, which is not a plain file"
        if not _OWN_NAMES.fullmatch(item.name):
            return f"it holds {item.name!r}, which is not a cache file"
    if leftover:
        return None
    if not (path / INDEX).is_file():
        return f"it has no {INDEX}"
    manifest = read_manifest(path)
    if not (manifest.ours or manifest.unreadable):  # unreadable among cache files only: a damaged context
        return f"its {INDEX} is not a difftune cache index"
    return None


class CacheFolderError(UserError):
    """A context folder difftune cannot use as it is (a symbolic link)."""


def hold_context(folder: Path) -> int | None:
    """Mark the context as in use for as long as the returned descriptor stays open: a
    shared lock on its .in-use file (several runs may share a context; `cache clear`
    needs the lock alone). Blocks only while `cache clear` removes the context; then the
    context is made again. None where the folder is read-only and has no .in-use: no one
    can remove it either."""
    path = folder / IN_USE
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        if folder.is_symlink():  # difftune makes a plain folder: someone else put a link there
            raise CacheFolderError(f"cache context {folder} is a symbolic link, which difftune never follows: "
                                   "remove the link (difftune cache clear leaves links alone)")
        fd = _open_lock(path)
        if fd is None:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        if _still_there(fd, path):
            with contextlib.suppress(OSError):  # its time is the context's last use (read-only: left as is)
                os.utime(fd)
            return fd
        os.close(fd)  # removed while we waited: make it again


def lock_alone(folder: Path) -> int | None:
    """The context's lock, taken exclusively without waiting, for removing it; None while
    a run holds it."""
    fd = _open_lock(folder / IN_USE)
    if fd is None:
        raise PermissionError(f"{folder} cannot be written")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def in_use(folder: Path) -> bool:
    """Whether a run holds the context now (nothing is created: `cache list` writes nothing)."""
    try:
        fd = os.open(folder / IN_USE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a pipe: no wait
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the lock, if taken
    return False


def _open_lock(path: Path) -> int | None:
    try:
        return open_own_file(path, os.O_RDWR | os.O_CREAT)
    except PermissionError:
        pass  # a read-only cache: a lock on an existing file still works
    try:
        return open_own_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def open_own_file(path: Path, flags: int) -> int:
    """One of the context's own files (its lock files), only ever a plain file: difftune
    makes plain files, so anything else there (a link, a named pipe, whose open would
    wait forever) is someone else's, and is removed (the name, not what a link points
    to) instead of being opened."""
    for _ in range(2):
        fd = _open_plain(path, flags)
        if fd is not None:
            return fd
        _remove_stranger(path)
    raise CacheFolderError(f"{path} is put back as something other than a plain file each time difftune "
                           "replaces it: remove it, and whatever makes it")


def _open_plain(path: Path, flags: int) -> int | None:
    """The file opened, or None where it is not a plain file. O_NONBLOCK: a named pipe
    opens at once (or fails, ENXIO) instead of waiting for its other end."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    if _not_plain(os.fstat(fd).st_mode) is not None:
        os.close(fd)
        return None
    os.set_blocking(fd, True)
    return fd


def _remove_stranger(path: Path) -> None:
    try:
        path.unlink()
    except OSError as error:
        raise CacheFolderError(f"{path} is not a plain file, and difftune cannot replace it "
                               f"({error.strerror or error}): remove it") from None


def _still_there(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _reason(error: OSError) -> str:
    return "a symbolic link, never followed" if error.errno == errno.ELOOP else (error.strerror or type(error).__name__)
