"""Checks on a run directory before a run writes into it (its layout: difftune/rundir.py),
and its lock (one process trains in it at a time)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from difftune.config import RunConfig
from difftune.paths import PathError
from difftune.rundir import LOCK_TEXT, RunDir
from difftune.training.checkpoint import ResumeError

_HELD: dict[Path, Any] = {}
"""Locks this process holds, by run directory: a later run in the same process (a
notebook, a test) takes the same directory again."""


def check_run_directory(run_dir: Path, config: RunConfig) -> None:
    """The output directory is new, empty, or a difftune run whose parts are what they
    should be; never a folder of the user's files (difftune would write over them), and
    never the dataset it trains on (the run's images would become training data)."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise PathError(f"train.output_dir = {str(run_dir)!r} is a symbolic link to {os.readlink(run_dir)}, "
                          "which does not exist")
    data = Path(config.data.path).expanduser()
    if data.is_dir() and (run_dir.resolve() == data.resolve() or data.resolve() in run_dir.resolve().parents):
        raise PathError(f"train.output_dir = {str(run_dir)!r} is inside data.path {config.data.path!r}: the "
                          "run's checkpoints and images would be read as training data. Give a folder outside it.")
    inside = next((folder for folder in run_dir.resolve().parents if RunDir(folder).is_run()), None)
    if inside is not None:
        raise PathError(f"train.output_dir = {str(run_dir)!r} is inside the run directory {str(inside)!r}: give "
                        "each run a folder of its own")
    if not run_dir.is_dir():
        return
    theirs = sorted(entry.name for entry in run_dir.iterdir())
    if theirs and not RunDir(run_dir).is_run():
        shown = ", ".join(theirs[:5]) + (f" and {len(theirs) - 5} more" if len(theirs) > 5 else "")
        raise PathError(f"train.output_dir = {str(run_dir)!r} holds files that are not a difftune run ({shown}); "
                          "difftune would write over them. Give an empty or new folder.")
    for name, kind in RunDir.ENTRIES.items():
        path = run_dir / name
        if path.exists() and path.is_dir() != (kind == "folder"):
            raise PathError(f"{path} should be a {kind}; this run directory was changed by hand. Move "
                              f"{name} away, or give another train.output_dir.")


def take_lock(run_dir: Path) -> Any:
    """Hold the run directory's lock for this process's lifetime (released by the OS
    when it ends, however it ends), so no other process trains in it at the same time."""
    key = run_dir.resolve()
    if key in _HELD:
        return _HELD[key]
    handle = open(RunDir(run_dir).lock, "a+")  # held open on purpose: the lock lives with it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ResumeError(
            f"{run_dir} is in use by another difftune run ({holder}); two runs in one directory would "
            "overwrite each other's checkpoints. Wait for it to end, or give another train.output_dir."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{LOCK_TEXT}{os.getpid()} on {os.uname().nodename}")
    handle.flush()
    _HELD[key] = handle
    return handle
