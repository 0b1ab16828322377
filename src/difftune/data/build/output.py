"""Where a dataset-building job (prepare, condition) writes, and how a second run into
the same OUT behaves:

- a new or empty OUT: the job writes there;
- OUT made by the same verb with the same settings and inputs (`identity`): the job
  resumes there (its journal skips what is done);
- OUT made by the same verb with other settings (another format, filters, shard size,
  kind, thresholds, input): the new output is built whole in a hidden folder beside OUT
  (`.OUT.difftune-next`) and then swapped in for the old one. The old output stays as it
  was until the new one is complete: a stopped run leaves it untouched, and the same
  command again resumes the hidden folder. OUT never mixes the two runs' files;
- anything else is refused: OUT is an input, holds an input, is a file, is a link (a
  swap renames OUT: it would replace the link, not the folder it leads to), holds files
  difftune did not write (or changed since it wrote them: owned.py), or another verb's
  output. Every refusal comes before anything is written.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.data.build.jobs import BOOKKEEPING, bookkeeping
from difftune.data.build.owned import forget_written, not_written, record_written
from difftune.errors import InputError
from difftune.paths import check_not_an_input

JOB = "job.json"


@dataclass(frozen=True)
class Output:
    final: Path
    """OUT, as the user gave it."""
    folder: Path
    """Where this run writes: OUT, or the hidden folder that replaces it when complete."""
    resumed: bool
    key: str = "OUT"

    def finish(self) -> None:
        """Record what this run wrote, and put a complete new output in OUT's place. OUT
        is checked again first: files the user put there during the run are not removed."""
        if self.folder != self.final:
            check_only_written(self.key, self.final)
        record_written(self.folder)
        if self.folder != self.final:
            swap_in(self.folder, self.final)


def claim_output(key: str, out: Path, verb: str, inputs: dict[str, Path | None], identity: dict[str, Any],
                 carried: tuple[str, ...] = ()) -> Output:
    """Make a folder ready for `verb` (see the module docstring). `carried`: files of
    OUT's .difftune/ that hold for any settings (prepare's measures), copied into a new
    replacement so its work is not done again."""
    check_not_a_link(key, out)
    check_not_an_input(key, out, {name: path for name, path in inputs.items() if path is not None})
    for name, path in inputs.items():
        if path is not None and path.exists() and out.exists() and out.resolve() in path.resolve().parents:
            raise InputError(f"{key} = {str(out)!r} holds {name} {str(path)!r}; give an output folder outside it")
    finish_interrupted_swap(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{key} = {str(out)!r} is a file; give a folder to write the dataset into")
    started = _job(key, out)
    if started is None:
        if out.exists() and any(out.iterdir()):
            raise InputError(f"{key} = {str(out)!r} is a folder with files that difftune did not write; give a new "
                             "or empty folder (nothing in it was changed)")
        if _job(key, replacement_folder(out)) is not None:
            shutil.rmtree(replacement_folder(out))  # a replacement of an OUT since deleted
        _start(out, verb, identity)
        return Output(out, out, resumed=False, key=key)
    if started.get("verb") != verb:
        raise InputError(f"{key} = {str(out)!r} holds the output of `difftune data {started.get('verb')}`; give a "
                         "new folder")
    check_only_written(key, out)
    if started.get("identity") == identity:
        forget_written(out)  # this run changes OUT in place: a stop leaves it as a stopped run's
        return Output(out, out, resumed=True, key=key)
    return Output(out, *_claim_replacement(key, out, verb, identity, carried), key=key)


def check_not_a_link(key: str, out: Path) -> None:
    """OUT, and the hidden folders beside it that a swap renames, are no links (a rename
    would move the link, and shutil.rmtree refuses one), and OUT's path does not loop."""
    hidden = ((replacement_folder(out), "builds the new"), (_old_folder(out), "sets aside the old"))
    for path, role in ((out, None), *hidden):
        if not path.is_symlink():
            continue
        if role is None:
            raise InputError(f"{key} = {str(out)!r} is a link (to {os.readlink(out)!r}); give a folder, not a link "
                             "to one: difftune swaps a new output in by renaming OUT, which would replace the link")
        raise InputError(f"{str(path)!r} (where difftune {role} output of {key}) is a link; move it away")
    try:
        out.resolve()
    except (RuntimeError, OSError) as error:  # a folder on OUT's path is a link that loops
        raise InputError(f"{key} = {str(out)!r}: its path cannot be followed ({error})") from None


def check_only_written(key: str, out: Path) -> None:
    """OUT holds only what difftune recorded writing there, as it wrote it (owned.py)."""
    found = not_written(out)
    if found is None:
        return
    name, how = found
    what = "which difftune did not write" if how == "added" else "which was changed since difftune wrote it"
    raise InputError(f"{key} = {str(out)!r} holds {name}, {what}; a run into {key} replaces what is there, so "
                     f"move {name} out of it, or give another folder (nothing was changed)")


def _claim_replacement(key: str, out: Path, verb: str, identity: dict[str, Any],
                       carried: tuple[str, ...]) -> tuple[Path, bool]:
    """The hidden folder a run with other settings writes to: resumed when a stopped run
    with these settings left it, else made afresh (a leftover of other settings is ours
    to remove: only difftune writes there)."""
    staging = replacement_folder(out)
    if staging.exists():
        started = _job(key, staging)
        if started is None and any(staging.iterdir()):
            raise InputError(f"{str(staging)!r} (where difftune builds the replacement of {key}) holds files "
                             "difftune did not write; move it away")
        if started is not None and started.get("verb") == verb and started.get("identity") == identity:
            return staging, True
        shutil.rmtree(staging)
    _start(staging, verb, identity)
    for name in carried:
        if (out / BOOKKEEPING / name).is_file():
            shutil.copyfile(out / BOOKKEEPING / name, staging / BOOKKEEPING / name)
    return staging, False


def replacement_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.difftune-next"


def _old_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.difftune-old"


def swap_in(staging: Path, out: Path) -> None:
    """Two renames, then the old output is removed: at every moment one whole output
    exists (finish_interrupted_swap completes a swap a kill cut short)."""
    old = _old_folder(out)
    if old.exists():
        shutil.rmtree(old)
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old)


def finish_interrupted_swap(out: Path) -> None:
    """A swap stopped between its renames left OUT missing (the new output is complete
    in the replacement folder) or the old output beside it: finish it."""
    old, staging = _old_folder(out), replacement_folder(out)
    if not old.is_dir() or not (old / BOOKKEEPING / JOB).is_file():
        return
    if not out.exists():
        os.replace(staging if staging.is_dir() else old, out)
    if old.exists():
        shutil.rmtree(old)


def _job(key: str, folder: Path) -> dict[str, Any] | None:
    """What .difftune/job.json says started the folder (None: no such file)."""
    owner = folder / BOOKKEEPING / JOB
    if not owner.is_file():
        return None
    try:
        started = json.loads(owner.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        started = None
    if not isinstance(started, dict):
        raise InputError(f"{key}: {owner} is not a job file difftune wrote; give a new folder")
    return started


def _start(folder: Path, verb: str, identity: dict[str, Any]) -> None:
    bookkeeping(folder)
    (folder / BOOKKEEPING / JOB).write_text(json.dumps({"verb": verb, "identity": identity}))
