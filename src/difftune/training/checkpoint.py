"""Checkpoints: accelerate state plus the trained weights in diffusers format.

A checkpoint is written to a hidden temporary folder and renamed into place once it
holds everything, with a COMPLETE marker last; a folder without the marker (a save cut
short) is never picked for resume. Old checkpoints are pruned only after a new one is
complete, so a crash during a save never leaves fewer than the limit.

Before the marker, MANIFEST.json records every file's size and checksum, and the run's
config is copied in (config.toml). Resuming verifies the checkpoint against its manifest
first: a file deleted, truncated or overwritten after the save makes difftune pass over
that checkpoint to the previous sound one, saying so, instead of failing after the
models load. So does any record that does not read as difftune writes it (the trainer
state, the engine, the data digest, the manifest itself, or its absence), a link or a
special file inside the checkpoint, and a pickle difftune does not write.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from difftune.errors import UserError
from difftune.files import apply_umask, crc32, fsync_tree, staging_path

if TYPE_CHECKING:  # this module is also read before torch is imported (resume checks)
    from accelerate import Accelerator

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
DCP_INDEX = re.compile(r"(pytorch_model_fsdp|optimizer)_\d+/\.metadata")
"""torch.distributed.checkpoint's index of a sharded state (FSDP2), which torch reads with
plain pickle.load: checked by `dcp_index_problem` before torch reads it."""
RECORDS_INTRODUCED_WITH_MANIFEST = (CONFIG_FILE, ENGINE_FILE, DATA_FILE)
"""A checkpoint with one of these was written by a difftune that writes MANIFEST.json
(2026-12-01 on): without its manifest, it is damaged."""
STATE_METADATA_KEY = "difftune.state"
"""Where an extra state's JSON counters sit in its safetensors header."""


class CheckpointedState(Protocol):
    """State kept beside the trained weights (the EMA): tensors by name plus JSON counters,
    saved as NAME.safetensors. Every rank calls both methods."""

    def checkpoint_tensors(self) -> tuple[dict[str, Any], dict[str, Any]]: ...

    def restore_tensors(self, tensors: dict[str, Any], counters: dict[str, Any]) -> None: ...


class ResumeError(UserError, ValueError):
    """train.resume names something that cannot be resumed from."""


class DiskSpaceError(UserError, RuntimeError):
    """Too little free disk space to write a whole checkpoint."""


def checkpoint_bytes(run_dir: Path, trainable_parameters: int) -> int:
    """What the next checkpoint will take: the size of the newest one, or before the
    first, 16 bytes a trainable parameter (fp32 weights plus AdamW's two fp32 moments,
    and a fp32 EMA or spare), plus 10 MB for RNG, scheduler and trainer state."""
    found = complete_checkpoints(run_dir)
    if found:
        return sum(f.stat().st_size for f in found[-1].rglob("*") if f.is_file())
    return trainable_parameters * 16 + 10 * 2**20


def check_disk_space(run_dir: Path, needed: int, step: int, what: str = "") -> str | None:
    """A message when the run directory's disk cannot hold `needed` bytes (with 10% to
    spare) for `what` (default: the step's checkpoint)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free
    if free >= needed * 1.1:
        return None
    found = complete_checkpoints(run_dir)
    last = f"the last complete checkpoint is {found[-1].name}" if found else "there is no checkpoint yet"
    return (
        f"not enough disk space for {what or f'the step-{step} checkpoint'}: it needs about {needed / 2**20:.0f} MB "
        f"and {free / 2**20:.0f} MB are free in {run_dir}. Nothing was written; {last}. "
        "Free some space (or lower train.checkpoints_total_limit) and run the same command to resume."
    )


@dataclass
class TrainState:
    """Where training stands: optimizer steps done, and the position in the data."""

    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    """Samples of this epoch's (padded) order consumed by all processes together."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:06d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(rf"{PREFIX}\d+", p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to continue from (see `pick_checkpoint`), without the passed-over list."""
    return pick_checkpoint(run_dir, resume)[0]


def is_checkpoint_name(resume: str) -> bool:
    """Whether train.resume is a bare name (step-000100), which names a checkpoint of this
    run whatever the current folder holds; with a folder in it (old/step-000100,
    ./step-000100, /abs, ~/x) it is a path."""
    return "/" not in resume and os.sep not in resume and not resume.startswith("~") and resume not in (".", "..")


def resume_path(run_dir: Path, resume: str) -> Path:
    """The whole path train.resume names (see `is_checkpoint_name`)."""
    if is_checkpoint_name(resume):
        return run_dir / "checkpoints" / resume
    return Path(os.path.abspath(Path(resume).expanduser()))


def pick_checkpoint(run_dir: Path, resume: str | None) -> tuple[Path | None, list[str]]:
    """The checkpoint to continue from, and a sentence for each damaged one passed over.

    With resume unset or "latest", the newest sound checkpoint: re-running the same
    command never throws finished work away, and a damaged newest checkpoint falls back
    to the one before. A checkpoint named explicitly must itself be sound.
    """
    if resume is None or resume == "latest":
        skipped = []
        for candidate in reversed(complete_checkpoints(run_dir)):
            problem = verify_checkpoint(candidate)
            if problem is None:
                return candidate, skipped
            skipped.append(f"{candidate.name} is damaged ({problem})")
        if skipped:
            raise ResumeError(
                f"every checkpoint in {run_dir / 'checkpoints'} is damaged: " + "; ".join(skipped)
                + ". Nothing was changed. To start over, move that folder away (or use another train.output_dir).")
        return None, []
    path = resume_path(run_dir, resume)
    if not (path / MARKER).is_file():
        reason = "does not exist" if not path.exists() else "is not a complete checkpoint"
        raise ResumeError(f"train.resume = {resume!r}: {path} {reason}")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ResumeError(f"train.resume = {resume!r}: {path} is damaged ({problem})")
    return path, []


def check_nothing_newer(run_dir: Path, chosen: Path, resume: str | None) -> None:
    """A checkpoint named in train.resume is where a run goes back to once: left in the
    config, it would send every later launch back there, and training on from it writes
    over the newer checkpoints. So a sound newer one in the run is refused, naming it."""
    if resume is None or resume == "latest":
        return
    step = checkpoint_step(chosen)
    newer = [c for c in complete_checkpoints(run_dir) if checkpoint_step(c) > step]
    newest = next((c for c in reversed(newer) if verify_checkpoint(c) is None), None)
    if newest is not None:
        raise ResumeError(
            f"train.resume = {resume!r} names {chosen}, but the run has a newer checkpoint, {newest}: training on "
            f"from {chosen.name} would write over it. To continue the run, set train.resume = \"latest\" (or "
            f"leave it out); to go back to {chosen.name}, delete the newer checkpoints first.")


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


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def store_trained_weights(accelerator: Accelerator, method: Any, names: list[str]) -> None:
    """Make accelerate's save_state/load_state keep each trained module the method's way
    (a diffusers folder for whole models, the adapter file for LoRA) under its name,
    instead of a second, anonymous copy. `names` follows the order given to prepare."""

    def save(models: list[Any], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            for name, model in zip(names, models):
                method.store(name, accelerator.unwrap_model(model), Path(output_dir))
        weights.clear()

    def load(models: list[Any], input_dir: str) -> None:
        for name, model in zip(names, models):
            method.restore(name, accelerator.unwrap_model(model), Path(input_dir))
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Folders left by saves that never finished (the process was killed mid-write)."""
    for partial in (run_dir / "checkpoints").glob(".*.partial"):
        shutil.rmtree(partial)


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, state: TrainState, total_limit: int | None,
    records: dict[str, str] | None = None, extras: dict[str, CheckpointedState] | None = None,
) -> Path:
    """Write accelerate state (weights in diffusers format), trainer state, the run's
    records (its config, CONFIG_FILE, and what it trains on, DATA_FILE), extra states
    (NAME.safetensors) and a manifest atomically; prune old checkpoints after the new one
    is complete."""
    final = checkpoint_dir(run_dir, state.step)
    staging = staging_path(final)
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    # save_state ends without a barrier: every rank must have written its RNG state
    # before the main process marks the folder complete and renames it.
    accelerator.wait_for_everyone()
    for name, extra in (extras or {}).items():
        _save_state_file(extra, staging / f"{name}.safetensors", accelerator.is_main_process)
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(json.dumps(asdict(state)))
        for name, text in (records or {}).items():
            (staging / name).write_text(text)
        apply_umask(staging)
        _fsync_tree(staging)
        _write_manifest(staging)
        (staging / MARKER).write_text("")
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _prune(run_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _check_random_state(file: Path) -> None:
    """accelerate passes over an RNG state it cannot read with a log line, and the resumed
    run would then draw other noise than the stopped one: refuse instead. Read with
    accelerate's own loader (weights_only=True: no code runs)."""
    from accelerate.utils import load

    try:
        states = load(str(file))
        readable = isinstance(states, dict) and "torch_manual_seed" in states
    except Exception as error:  # the restricted unpickler's refusals are of many types
        raise ResumeError(f"{file} cannot be restored as random state ({type(error).__name__}); it was "
                          "not written by difftune, or is damaged") from error
    if not readable:
        raise ResumeError(f"{file} cannot be restored: it holds no random state")


def _save_state_file(extra: CheckpointedState, file: Path, main: bool) -> None:
    from safetensors.torch import save_file

    tensors, counters = extra.checkpoint_tensors()  # every rank: gathering may be a collective
    if main:
        save_file(tensors, str(file), metadata={STATE_METADATA_KEY: json.dumps(counters)})


def _load_state_file(extra: CheckpointedState, file: Path) -> None:
    """Restore one extra state; a file missing or unfit raises ResumeError naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not file.is_file():
        raise ResumeError(f"{file} is missing: the checkpoint was written without it (another [method] "
                          "config, or a difftune before 2026-12). Resume with the config that wrote it.")
    try:
        with safe_open(str(file), framework="pt") as opened:
            counters = json.loads((opened.metadata() or {})[STATE_METADATA_KEY])
        extra.restore_tensors(load_file(str(file)), counters)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ResumeError(f"{file} cannot be restored ({type(error).__name__}: {error})") from error


def _write_manifest(folder: Path) -> None:
    files = {
        str(f.relative_to(folder)): {"bytes": f.stat().st_size, "crc32": crc32(f)}
        for f in sorted(folder.rglob("*")) if f.is_file()
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def check_same_engine(path: Path, engine: dict[str, Any]) -> None:
    """A checkpoint resumes on the launch that wrote it: each rank's random state and the
    data order (padded to the global batch) belong to its process count, and sharded
    weights are stored in another layout than whole ones."""
    was, now = read_engine(path), engine
    if was is None:  # written before checkpoints recorded their engine
        return
    if isinstance(was, str):  # verified before: changed since
        raise ResumeError(f"{path} is damaged ({was}); set train.resume to an earlier checkpoint")
    if was != now:
        raise ResumeError(
            f"{path} was written by {was['processes']} process(es) ({was['engine']}); this launch has "
            f"{now['processes']} ({now['engine']}). Resume it with the launch config that wrote it, or give "
            "another train.output_dir for a new run."
        )


def load_checkpoint(accelerator: Accelerator, path: Path, engine: dict[str, Any] | None = None,
                    extras: dict[str, CheckpointedState] | None = None) -> TrainState:
    """Restore the accelerate state and the extra states; a failure names the checkpoint
    instead of a traceback from inside accelerate (the checkpoint was verified, so this
    means another version of a library wrote it, or someone crafted it)."""
    if engine is not None:  # what wrote the checkpoint must be what resumes it (Engine.record)
        check_same_engine(path, engine)
    refuse_unsafe_files(path)  # verified before; checked again right before reading
    _check_random_state(path / f"random_states_{accelerator.process_index}.pkl")
    try:
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as error:  # torch's restricted unpickler refused one of the files
        raise ResumeError(_refused_pickle(path, error)) from None
    except Exception as error:
        raise ResumeError(
            f"{path} cannot be restored ({type(error).__name__}: {error}). It was written by another "
            "setup (number of processes, library versions?); resume with the one that wrote it, "
            "or set train.resume to an earlier checkpoint."
        ) from error
    for name, extra in (extras or {}).items():
        _load_state_file(extra, path / f"{name}.safetensors")
    state = _read_state(path)
    assert isinstance(state, TrainState)  # verified before
    return state


def _refused_pickle(path: Path, error: pickle.UnpicklingError) -> str:
    """What is wrong when torch refuses one of accelerate's pickles: not another setup
    (those files hold tensors and plain values in every version), but a file that names
    code to run, or is no pickle torch wrote. Which file: the first that torch refuses
    again, smallest first (a crafted file is small; the optimizer state may be large)."""
    named = re.search(r"GLOBAL ([\w.]+)", str(error))
    why = (f"it is a pickle that names {named[1]}, which torch's restricted unpickler refused to load" if named
           else "torch's restricted unpickler refused it (it is not a pickle of tensors and plain values)")
    files = sorted((f for f in path.iterdir() if ACCELERATE_PICKLE.fullmatch(f.name)), key=lambda f: f.stat().st_size)
    culprit = next((file for file in files if _refused(file)), path)
    return (f"{culprit} cannot be restored: {why}. difftune never writes such a file, so the checkpoint was "
            "changed after it was saved; nothing in it was run. Set train.resume to another checkpoint.")


def _refused(file: Path) -> bool:
    """Whether torch's restricted unpickler refuses the file, read as accelerate reads it."""
    from accelerate.utils import load

    try:
        load(str(file), map_location="cpu")
    except pickle.UnpicklingError:
        return True
    except Exception:  # noqa: BLE001 (refused otherwise, or not at all: not the file asked for)
        return False
    return False


def _prune(run_dir: Path, total_limit: int | None) -> None:
    if total_limit is None:
        return
    found = complete_checkpoints(run_dir)
    for old in found[: max(0, len(found) - total_limit)]:
        shutil.rmtree(old)


def _fsync_tree(root: Path) -> None:
    fsync_tree(root)


# --- torch.distributed.checkpoint's pickled index ------------------------------------------

DCP_RECORDS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
}
"""DCP's own records: dataclasses whose state the index sets (BUILD)."""
DCP_VALUES = {
    "torch.distributed.checkpoint.metadata": {"_MEM_FORMAT_ENCODING"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
"""The other names an index may hold: an enum, torch's layout by name, a path, an ordered
dict, and torch.Size and its dtypes (TORCH_VALUES). Called with any arguments, none of
these (nor a record's constructor) runs anything."""
TORCH_VALUES = re.compile(r"Size|bool|bfloat16|(u?int|float|complex)\d+|float8_e\w+")


class _StandIn:
    """Built in place of what the index names while it is checked, keeping the arguments
    and state it is given; `name` says what it stands for."""

    name = ""
    record = False

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        made = object.__new__(cls)
        made.args, made.state = args, None
        return made

    def __init__(self, *args: Any) -> None:  # a REDUCE: the constructor's arguments
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _IndexCheck(pickle._Unpickler):  # the Python unpickler, whose opcodes can be overridden
    """Reads an index with a stand-in for each name it allows and refuses any other name,
    and any state set on what is not a fresh DCP record (a class, a dtype, an enum member):
    whatever this accepts, torch's own pickle.load of it builds records and values only."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.made: list[_StandIn] = []

    def find_class(self, module: str, name: str) -> Any:
        record = name in DCP_RECORDS.get(module, ())
        if not (record or name in DCP_VALUES.get(module, ()) or (module == "torch" and TORCH_VALUES.fullmatch(name))):
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        made = self.made

        def new(cls: type, *args: Any, **kwargs: Any) -> _StandIn:
            instance = _StandIn.__new__(cls, *args)
            made.append(instance)
            return instance

        return type(name, (_StandIn,), {"name": name, "record": record, "__new__": new})

    def load_build(self) -> None:
        target = self.stack[-2]
        if isinstance(target, type) or not getattr(target, "record", False):
            raise pickle.UnpicklingError("it sets the state of something other than one of its records")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def dcp_index_problem(path: Path) -> str | None:
    """Why a sharded state's DCP index (FSDP2: pytorch_model_fsdp_N/.metadata,
    optimizer_N/.metadata) may not be read by torch, which unpickles it with no limit on
    what it runs: it must name only DCP's records, and point at data inside its folder."""
    for index in sorted(path.glob("*/.metadata")):
        name = str(index.relative_to(path))
        if not DCP_INDEX.fullmatch(name):
            return f"{name} is a file difftune does not write, and may be a pickle; it was not read"
        problem = _index_problem(index)
        if problem is not None:
            return f"{name} is not an index torch.distributed.checkpoint writes: {problem}; it was not read"
    return None


def _index_problem(index: Path) -> str | None:
    try:
        with open(index, "rb") as file:
            check = _IndexCheck(file)
            check.load()
    except pickle.UnpicklingError as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 (a crafted pickle fails in many ways; each is a refusal)
        return f"it does not read: {type(error).__name__}"
    outside = next((where for where in _data_paths(check.made) if not _plain_name(where)), None)
    return None if outside is None else f"it points at {outside!r}, outside its folder"


def _data_paths(made: list[_StandIn]) -> list[Any]:
    """Every relative_path the index gives, set as state (as DCP writes it) or passed to
    _StorageInfo's constructor: where torch would read a tensor's bytes from."""
    paths = [stand.args[0] for stand in made if stand.name == "_StorageInfo" and stand.args]
    for stand in made:
        state = stand.state[1] if isinstance(stand.state, tuple) and len(stand.state) == 2 else stand.state
        if isinstance(state, dict) and "relative_path" in state:
            paths.append(state["relative_path"])
    return paths


def _plain_name(where: Any) -> bool:
    return isinstance(where, str) and where not in ("", ".", "..") and Path(where).name == where
