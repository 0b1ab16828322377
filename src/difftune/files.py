"""Writing results so that a reader never sees half of one: staging, fsync, rename, modes.

Every folder or file a run publishes (a checkpoint, final/, an exported file) is written
under a hidden temporary name, flushed to disk, given the modes the user's umask asks for,
and renamed into place in one step.
"""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

_CHUNK = 1 << 24


def umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give every file and folder under root (and root) the modes the umask gives a new
    file. safetensors writes through a private temporary file (mode 0600), which would
    leave weights that no one else in the user's group can read."""
    mask = umask()
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def fsync_tree(root: Path) -> None:
    """Flush every file under root (or root itself) to the disk."""
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def crc32(path: Path) -> str:
    """A checksum of a file's bytes (3 GB/s: cheap enough for every checkpoint)."""
    value = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return f"{value:08x}"


def staging_path(final: Path) -> Path:
    """The hidden name a result is written under before it is renamed to `final`."""
    return final.with_name(f".{final.name}.partial")


def publish(staging: Path, final: Path, previous: Path | None = None) -> None:
    """Move a complete staging file or folder to `final`. An existing `final` is moved to
    `previous` when given (kept), else removed, only once the new one is complete."""
    apply_umask(staging)
    fsync_tree(staging)
    if final.exists():
        if previous is not None:
            if previous.exists():
                shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
            os.replace(final, previous)
        elif final.is_dir():
            shutil.rmtree(final)
    os.replace(staging, final)


def discard(staging: Path) -> None:
    """Remove a staging file or folder, if there is one."""
    if staging.is_dir():
        shutil.rmtree(staging)
    elif staging.exists():
        staging.unlink()
