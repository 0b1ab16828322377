"""The data verbs read only inside IN (and --conditioning) and write only inside OUT.

A dataset is often downloaded: its metadata.jsonl, its links and its caption files are
written by someone else. A `file_name` of "../../.ssh/id_rsa.png" or "/etc/x.png", or a
link to a file elsewhere, must not make `prepare` copy that file into a dataset the user
then publishes, nor make `condition` write "OUT/images/../../x". So every name a file
gives is cleaned here (relative, no "." or ".." parts) and followed through its links; a
name that leads out of its folder is refused with the file and row that gave it. Links
inside the folder to files inside it are fine.
"""

from __future__ import annotations

from pathlib import Path, PureWindowsPath

from difftune.errors import DataError


def clean_name(value: str) -> str | None:
    """`value` as a relative POSIX path without empty, "." or ".." parts; None when it is
    absolute (or has a drive) or its ".." parts climb out of the folder."""
    if not value or value.startswith(("/", "\\")) or PureWindowsPath(value).drive:
        return None
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
    return "/".join(parts) or None


def resolves_inside(folder: Path, path: Path) -> bool:
    """`path`, its links followed, is `folder` or inside it (`folder`'s own links too)."""
    return path.resolve().is_relative_to(folder.resolve())


def outside_problem(folder: Path, value: str, where: str, label: str) -> str | None:
    """Why `folder / value` is not a file name inside `folder` (None: it is). `where`
    names the file, row and key that gave the value; `label` the folder (IN, OUT, ...)."""
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
        raise DataError(f"{path} is a link that points outside {label} ({path.resolve()}); difftune reads and "
                        f"writes only inside {label}")
