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
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from difftune.errors import UserError
from difftune.files import apply_umask, crc32, fsync_tree, staging_path
from difftune.training.checkpoint_checks import (  # noqa: F401 (callers import them from here too)
    ACCELERATE_PICKLE, CONFIG_FILE, DATA_FILE, ENGINE_FILE, MANIFEST, MARKER, PREFIX, STATE_FILE,
    STATE_METADATA_KEY, ResumeError, TrainState, _read_state, read_engine,
    refuse_unsafe_files, verify_checkpoint,
)

if TYPE_CHECKING:  # this module is also read before torch is imported (resume checks)
    from accelerate import Accelerator


class CheckpointedState(Protocol):
    """State kept beside the trained weights (the EMA): tensors by name plus JSON counters,
    saved as NAME.safetensors. Every rank calls both methods."""

    def checkpoint_tensors(self) -> tuple[dict[str, Any], dict[str, Any]]: ...

    def restore_tensors(self, tensors: dict[str, Any], counters: dict[str, Any]) -> None: ...


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
