"""Checkpoints: accelerate state plus the trained weights in diffusers format.

A checkpoint is written to a hidden temporary folder and renamed into place once it
holds everything, with a COMPLETE marker last; a folder without the marker (a save cut
short) is never picked for resume. Old checkpoints are pruned only after a new one is
complete, so a crash during a save never leaves fewer than the limit.

Before the marker, MANIFEST.json records every file's size and checksum, and the run's
config is copied in (config.toml). Resuming verifies the checkpoint against its manifest
first: a file deleted, truncated or overwritten after the save makes difftune pass over
that checkpoint to the previous sound one, saying so, instead of failing after the
models load.
"""

from __future__ import annotations

import json
import os
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
RNG_PICKLE = re.compile(r"random_states_\d+\.pkl")
"""The one pickle a checkpoint holds: accelerate's RNG state, read with weights_only=True
(torch's restricted unpickler, which builds tensors and numpy arrays and calls nothing)."""
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
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def resolve_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to continue from (see `pick_checkpoint`), without the passed-over list."""
    return pick_checkpoint(run_dir, resume)[0]


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
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = run_dir / "checkpoints" / resume
    if not (path / MARKER).is_file():
        reason = "does not exist" if not path.exists() else "is not a complete checkpoint"
        raise ResumeError(f"train.resume = {resume!r}: {path} {reason}")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ResumeError(f"train.resume = {resume!r}: {path} is damaged ({problem})")
    return path, []


def verify_checkpoint(path: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from (None: it is sound)."""
    state = _read_state(path)
    if isinstance(state, str):
        return state
    if f"{PREFIX}{state.step:06d}" != path.name:
        return f"{STATE_FILE} says step {state.step}, the folder name says {path.name}"
    foreign = foreign_pickles(path)
    if foreign:
        return (f"{foreign[0]} is a pickle that difftune does not write, and reading a pickle can run code; "
                "it was not read")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        # Written by a difftune from before manifests: check what can be checked.
        return None if any(path.glob("random_states_*.pkl")) else "no random_states_*.pkl (RNG state)"
    try:
        files = json.loads(manifest_file.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError) as error:
        return f"{MANIFEST} is unreadable ({type(error).__name__})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written"
        if crc32(file) != expected["crc32"]:
            return f"{name} has changed since it was written (checksum)"
    return None


def foreign_pickles(path: Path) -> list[str]:
    """Pickle files in a checkpoint other than accelerate's RNG states (accelerate's
    custom-state pickles are read with weights_only=False: difftune never writes them,
    and an EMA checkpoint of a difftune before 2026-12 is refused for that reason)."""
    return sorted(str(f.relative_to(path)) for f in path.rglob("*")
                  if f.suffix in (".pkl", ".pickle") and not RNG_PICKLE.fullmatch(f.name))


def _read_state(path: Path) -> TrainState | str:
    try:
        return TrainState(**json.loads((path / STATE_FILE).read_text()))
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (ValueError, TypeError, OSError) as error:
        return f"{STATE_FILE} is unreadable ({type(error).__name__})"


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
    recorded = path / ENGINE_FILE
    if not recorded.is_file():  # written before checkpoints recorded their engine
        return
    was, now = json.loads(recorded.read_text()), engine
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
    foreign = foreign_pickles(path)  # verified before; checked again right before reading
    if foreign:
        raise ResumeError(f"{path / foreign[0]} is a pickle that difftune does not write; it was not read")
    _check_random_state(path / f"random_states_{accelerator.process_index}.pkl")
    try:
        accelerator.load_state(str(path))
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


def _prune(run_dir: Path, total_limit: int | None) -> None:
    if total_limit is None:
        return
    found = complete_checkpoints(run_dir)
    for old in found[: max(0, len(found) - total_limit)]:
        shutil.rmtree(old)


def _fsync_tree(root: Path) -> None:
    fsync_tree(root)
