"""What makes a checkpoint sound before anything in it is read: its records (trainer
state, engine, data digest) read as difftune writes them, its manifest's files are there
with their sizes and checksums, it holds no link, special file or pickle difftune does not
write, and a sharded state's index names only torch.distributed.checkpoint's records
(training/dcp_index.py). Torch-free: `train` runs these before any model loads."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from difftune.errors import UserError
from difftune.files import crc32
from difftune.training.dcp_index import dcp_index_problem

PREFIX = "step-"
MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
MANIFEST = "MANIFEST.json"
CONFIG_FILE = "config.toml"
DATA_FILE = "data.json"
ENGINE_FILE = "engine.json"
"""How many processes wrote the checkpoint, and whether their weights were sharded."""
ACCELERATE_PICKLE = re.compile(
    r"random_states_\d+\.pkl|(optimizer|scheduler|sampler|dl_state_dict|pytorch_model_fsdp)(_\d+)?\.bin|scaler\.pt")
"""The pickles a checkpoint may hold at its top: the files accelerate writes and reads
back with weights_only=True (torch's restricted unpickler, which builds tensors and numpy
arrays and calls nothing). Any other file named as a pickle is refused unread."""
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
RECORDS_INTRODUCED_WITH_MANIFEST = (CONFIG_FILE, ENGINE_FILE, DATA_FILE)
"""A checkpoint with one of these was written by a difftune that writes MANIFEST.json
(2026-12-01 on): without its manifest, it is damaged."""
STATE_METADATA_KEY = "difftune.state"
"""Where an extra state's JSON counters sit in its safetensors header."""



class ResumeError(UserError, ValueError):
    """train.resume names something that cannot be resumed from."""


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, and the position in the data."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    """Samples of this epoch's (padded) order consumed by all processes together."""



def verify_checkpoint(path: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from (None: it is sound). Nothing is
    read through a link, and no pickle but DCP's index (by a loader that builds nothing)."""
    checks = (_odd_entry, _state_problem, _foreign_pickle, _manifest_problem, _records_problem, dcp_index_problem)
    return next((problem for check in checks if (problem := check(path)) is not None), None)


def refuse_unsafe_files(path: Path) -> None:
    """Right before a checkpoint is read (it was verified, but may have changed since): a
    link, a special file, a foreign pickle or a DCP index naming code is a ResumeError."""
    for check in (_odd_entry, _foreign_pickle, dcp_index_problem):
        problem = check(path)
        if problem is not None:
            raise ResumeError(f"{path} cannot be resumed from: {problem}")


def _odd_entry(path: Path) -> str | None:
    """A link (its target may be anywhere) or a special file (a FIFO would block the
    read): difftune writes neither into a checkpoint."""
    for entry in path.rglob("*"):  # rglob does not descend into linked folders
        if entry.is_symlink():
            return f"{entry.relative_to(path)} is a link (to {os.readlink(entry)}), which difftune never writes"
        if not entry.is_dir() and not entry.is_file():
            return f"{entry.relative_to(path)} is not a regular file"
    return None


def foreign_pickles(path: Path) -> list[str]:
    """Files in a checkpoint named as pickles (.pkl, .bin, .pt...) other than accelerate's
    own, which it reads with weights_only=True. accelerate's custom-state pickles are read
    with weights_only=False: difftune never writes them, and an EMA checkpoint of a
    difftune before 2026-12 is refused for that reason."""
    return sorted(str(f.relative_to(path)) for f in path.rglob("*")
                  if f.suffix.lower() in PICKLE_SUFFIXES and not (f.parent == path and ACCELERATE_PICKLE.fullmatch(f.name)))


def _foreign_pickle(path: Path) -> str | None:
    foreign = foreign_pickles(path)
    if not foreign:
        return None
    return (f"{foreign[0]} is a pickle that difftune does not write, and reading a pickle can run code; "
            "it was not read")


def _state_problem(path: Path) -> str | None:
    state = _read_state(path)
    if isinstance(state, str):
        return state
    if f"{PREFIX}{state.step:06d}" != path.name:
        return f"{STATE_FILE} says step {state.step}, the folder name says {path.name}"
    return None


def _read_state(path: Path) -> TrainState | str:
    try:
        state = TrainState(**json.loads((path / STATE_FILE).read_text()))
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (ValueError, TypeError, OSError) as error:
        return f"{STATE_FILE} is unreadable ({type(error).__name__})"
    for key, value in asdict(state).items():
        if type(value) is not int or value < 0:  # bool is an int subclass: not a count
            return f"{STATE_FILE} has {key} = {json.dumps(value)}, not a whole number of 0 or more"
    return state


def _manifest_problem(path: Path) -> str | None:
    """The files the manifest lists are there, of the size and checksum written."""
    files = _read_manifest(path)
    if isinstance(files, str):
        return files
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written"
        if crc32(file) != expected["crc32"]:
            return f"{name} has changed since it was written (checksum)"
    return None


def _read_manifest(path: Path) -> dict[str, dict[str, Any]] | str:
    """The manifest's files, each inside the checkpoint with its bytes and crc32; a
    sentence when it is missing or of another shape ({} for a pre-manifest checkpoint)."""
    if not (path / MANIFEST).is_file():
        return _no_manifest(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__})"
    if not isinstance(files, dict) or not all(_manifest_entry(entry) for entry in files.values()):
        return f"{MANIFEST} does not list files with their bytes and crc32, as difftune writes it"
    outside = next((name for name in files if not _inside(name)), None)
    if outside is not None:
        return f"{MANIFEST} lists {outside}, which is outside the checkpoint"
    return files


def _manifest_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and type(entry.get("bytes")) is int and isinstance(entry.get("crc32"), str)


def _inside(name: str) -> bool:
    """A manifest name is a path inside the checkpoint: relative, with no '..' part."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _no_manifest(path: Path) -> dict[str, dict[str, Any]] | str:
    """Every difftune that wrote config.toml, engine.json or data.json into a checkpoint
    wrote MANIFEST.json with them (2026-12-01 on): such a checkpoint without it is
    damaged. One with none of them is a difftune's from before: check what can be."""
    record = next((name for name in RECORDS_INTRODUCED_WITH_MANIFEST if (path / name).exists()), None)
    if record is not None:
        return f"{MANIFEST} is missing, and every difftune that writes {record} into a checkpoint writes it"
    return {} if any(path.glob("random_states_*.pkl")) else "no random_states_*.pkl (RNG state)"


def _records_problem(path: Path) -> str | None:
    """engine.json and data.json, when there, read as difftune writes them."""
    engine = read_engine(path)
    if isinstance(engine, str):
        return engine
    if (path / DATA_FILE).is_file():
        try:
            data = json.loads((path / DATA_FILE).read_text())
        except (ValueError, OSError) as error:
            return f"{DATA_FILE} is unreadable ({type(error).__name__})"
        if not isinstance(data, dict):
            return f"{DATA_FILE} is not the digest of rows difftune writes"
    return None


def read_engine(path: Path) -> dict[str, Any] | str | None:
    """What engine.json records (None: a checkpoint from before it was written), or why it
    cannot be used."""
    recorded = path / ENGINE_FILE
    if not recorded.is_file():
        return None
    try:
        engine = json.loads(recorded.read_text())
    except (ValueError, OSError) as error:
        return f"{ENGINE_FILE} is unreadable ({type(error).__name__})"
    if not isinstance(engine, dict) or type(engine.get("processes")) is not int \
            or not isinstance(engine.get("engine"), str):
        return f"{ENGINE_FILE} does not say how many processes wrote the checkpoint and on which engine"
    return engine
