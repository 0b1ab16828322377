"""The data verbs read only inside IN (and --conditioning) and write only inside OUT.

A dataset is often downloaded: its metadata.jsonl, its links and its caption files are
written by someone else. A `file_name` of "../../.ssh/id_rsa.png" or "/etc/x.png", or a
link to a file elsewhere, must not make `prepare` copy that file into a dataset the user
then publishes, nor make `condition` write "OUT/images/../../x". So every name a file
gives is cleaned here (relative, no "." or ".." parts) and followed through its links; a
name that leads out of its folder is refused with the file and row that gave it. Links
inside the folder to files inside it are fine.

A name that no file can have (a NUL byte) or that names the folder itself (".", "a/..")
is not a file of the dataset at all: `name_problem` says so, and the verbs stop on it,
naming the row. Links that loop are followed as far as they go (os.path.realpath), never
raising: reading one later fails, and that failure names the file.
"""

from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath

from difftune.errors import DataError


def clean_name(value: str) -> str | None:
    """`value` as a relative POSIX path without empty, "." or ".." parts; None when it is
    absolute (or has a drive), its ".." parts climb out of the folder, or nothing is left."""
    parts = None if _absolute(value) else _parts(value)
    return "/".join(parts) if parts else None


def _absolute(value: str) -> bool:
    return value.startswith(("/", "\\")) or bool(PureWindowsPath(value).drive)


def _parts(value: str) -> list[str] | None:
    """The parts left once "", "." and ".." are applied; None when ".." climbs out."""
    parts: list[str] = []
    for part in value.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return parts


def name_problem(value: object, where: str, label: str) -> str | None:
    """Why `value` cannot name a file in a folder at all (None: it can, inside or out).
    `where` names the file, row and key that gave the value."""
    if not isinstance(value, str) or not value:
        shown = "empty" if value == "" else "missing" if value is None else value_kind(value)
        return f"{where} is {shown}, not a file name"
    if "\x00" in value:
        return f"{where} {value!r} holds a NUL byte, which no file name can"
    if any("\ud800" <= c <= "\udfff" for c in value):  # JSON's "\udcff": metadata.jsonl could not be written
        return f"{where} {value!r} is not UTF-8 text (it holds an unpaired surrogate escape)"
    if not _absolute(value) and _parts(value) == []:  # "." or "a/..": the folder, not outside it
        return f"{where} {value!r} names the folder {label} itself, not a file in it"
    return None


def value_kind(value: object) -> str:
    """How a message calls a JSON value's type (as data check's diagnose does)."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def resolved(path: Path) -> Path:
    """`path` with its links followed as far as they go: a loop stays unresolved instead
    of raising (Path.resolve raises RuntimeError), so a loop is read, and named, later."""
    return Path(os.path.realpath(path))


def resolves_inside(folder: Path, path: Path) -> bool:
    """`path`, its links followed, is `folder` or inside it (`folder`'s own links too)."""
    return resolved(path).is_relative_to(resolved(folder))


def outside_problem(folder: Path, value: str, where: str, label: str) -> str | None:
    """Why `folder / value` is not a file name inside `folder` (None: it is). `where`
    names the file, row and key that gave the value; `label` the folder (IN, OUT, ...).
    A name no file can have is a DataError (name_problem): it is not a file anywhere."""
    problem = name_problem(value, where, label)
    if problem:
        raise DataError(problem)
    name = clean_name(value)
    if name is None or not resolves_inside(folder, folder / name):
        return f"{where} {value!r} points outside {label}"
    return None


def inside_name(value: str, label: str) -> str:
    """A cleaned name for a file written under a folder; a name that would climb out is a
    ValueError (the names come from checked inputs: this is the last guard, not the check)."""
    name = clean_name(value)
    if name is None:
        raise ValueError(f"{value!r} would be written outside {label}")
    return name


def check_link_inside(folder: Path, path: Path, label: str) -> None:
    """A file the verb reads or writes as a whole (metadata.jsonl, the .difftune folder)
    that is a link out of `folder` stops the verb: reading it reads a file elsewhere,
    writing it writes there."""
    if (path.exists() or path.is_symlink()) and not resolves_inside(folder, path):
        raise DataError(f"{path} is a link that points outside {label} ({resolved(path)}); difftune reads and "
                        f"writes only inside {label}")
