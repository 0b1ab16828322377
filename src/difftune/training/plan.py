"""What `train` will do with its run directory, decided before torch is imported.

A run directory holds one run. Starting `train` on it either starts that run, continues
it from a checkpoint, or finds it finished; never anything that mixes two runs or throws
finished work away:

- the paths the config names are checked first (models, output directory, data,
  validation images: source_checks.py), before the run directory is created;
- one process at a time: a lock file in the run directory;
- a checkpoint is verified before it is used (a damaged one is passed over, saying so);
- resuming with settings that change the run itself (learning rate, data, batch size,
  model, method...) is refused with the list of differences; settings that only change
  how the run is watched, saved or sped up may change (`MAY_CHANGE`), and each change
  is reported and recorded (resume_contract.py);
- a finished run is not trained again: it says where its result is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.config import RunConfig, with_absolute_paths
from difftune.data.rows import CheckedRows, check_rows
from difftune.paths import check_output_dir
from difftune.rundir import RunDir
from difftune.training.checkpoint import (
    MARKER,
    ResumeError,
    check_nothing_newer,
    checkpoint_dir,
    checkpoint_step,
    is_checkpoint_name,
    pick_checkpoint,
)
from difftune.training.final import finished_step
from difftune.training.resume_contract import (
    check_same_data,
    compare_configs,
    keep_chosen_caches,
    recorded_config,
)
from difftune.training.rundir import check_run_directory, take_lock
from difftune.training.source_checks import check_edit_rows, check_sources

logger = logging.getLogger(__name__)


@dataclass
class RunPlan:
    config: RunConfig
    """The config to run: local paths made absolute (config.with_absolute_paths)."""
    run_dir: Path
    resume_from: Path | None = None
    finished_at: int | None = None
    """The run already finished at this step: there is nothing to train."""
    data: CheckedRows | None = None
    """The training rows, checked (None for a finished run: nothing to train)."""
    changes: list[str] = field(default_factory=list)
    """Settings that differ from the checkpoint's and may (MAY_CHANGE), as "key: old -> new"."""
    skipped: list[str] = field(default_factory=list)
    """Damaged checkpoints passed over, each with why."""
    lock: Any = None


def main_process_by_environment() -> bool:
    """Whether this is the main process of a launch (torchrun and accelerate set RANK),
    known before the accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


def plan_run(config: RunConfig, main_process: bool = True) -> RunPlan:
    """Check the paths, take the run directory's lock, pick the checkpoint and hold the
    config and the data against it. Raises a UserError naming the problem; creates only
    the run directory and its lock file, and only once everything is sound (an existing
    run directory is locked first, so no other run changes it while it is read)."""
    config = with_resume_kept(with_absolute_paths(config), config.train.resume)
    check_sources(config)
    run_dir = check_output_dir("train.output_dir", config.train.output_dir)
    check_run_directory(run_dir, config)
    plan = RunPlan(config, run_dir)
    if main_process and run_dir.is_dir():
        plan.lock = take_lock(run_dir)
    plan.resume_from, plan.skipped = pick_checkpoint(run_dir, config.train.resume)
    recorded = recorded_config(run_dir, plan.resume_from)
    if recorded is not None and plan.resume_from is not None:
        keep_chosen_caches(config, recorded)
    finished = finished_step(run_dir)
    if recorded is not None and (plan.resume_from is not None or finished is not None):
        plan.changes = compare_configs(recorded, config, plan.resume_from or run_dir)
    at = checkpoint_step(plan.resume_from) if plan.resume_from is not None else 0
    if finished is not None and _reached(config, recorded, finished):
        plan.finished_at = finished
    elif finished is not None and plan.resume_from is None:
        raise ResumeError(
            f"{run_dir} finished at step {finished} and has no checkpoint to continue from: training longer "
            "would start again from step 0. Start a new run in another train.output_dir (its base can be "
            f"this run's result, {run_dir / 'final'}).")
    elif config.train.max_steps is not None and at > config.train.max_steps:
        raise ResumeError(
            f"train.max_steps = {config.train.max_steps}, but the run in {run_dir} is at step {at} "
            f"({plan.resume_from.name if plan.resume_from else ''}): a run cannot go back. Raise max_steps "
            "to continue it, or give another train.output_dir for a new run.")
    if plan.finished_at is None and plan.resume_from is not None:
        check_nothing_newer(run_dir, plan.resume_from, config.train.resume)
    if plan.finished_at is None and not config.data.streaming:  # a stream is checked as it is read
        method = config.method
        plan.data = check_rows(config.data, config.train.seed, method.needs_conditioning, method.fixed_caption,
                               method.takes_references)
        if plan.resume_from is not None:
            check_same_data(plan.resume_from, plan.data)
    if plan.finished_at is None and config.method.takes_references:
        check_edit_rows(config, plan.data)  # a stream's rows: as they are read
    if main_process and plan.lock is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        plan.lock = take_lock(run_dir)
    return plan


def with_resume_kept(config: RunConfig, given: str | None) -> RunConfig:
    """A bare checkpoint name in train.resume stays a name (a checkpoint of this run,
    checkpoint.resume_path), where making paths absolute would have turned it into a
    folder of that name in the current directory, had one been there."""
    if given is not None and is_checkpoint_name(given):
        config.train.resume = given
    return config


def finished_message(plan: RunPlan) -> str:
    """What `train` does with a run that finished before (nothing), and where its result
    is; a max_steps below the finished step is named, since the run is not cut back."""
    assert plan.finished_at is not None
    text = (f"this run finished at step {plan.finished_at}: its result is {plan.run_dir / 'final'}. "
            "Nothing was trained or changed.")
    asked = plan.config.train.max_steps
    if asked is None or asked >= plan.finished_at:
        return text + " To train longer, raise train.max_steps; for a new run, give another train.output_dir."
    return (text + f" train.max_steps = {asked} is below that, and a finished run is not cut back "
            f"({_kept_at(plan.run_dir, asked)}); for a {asked}-step result, start a new run in another "
            "train.output_dir.")


def _kept_at(run_dir: Path, step: int) -> str:
    """What the run keeps of an earlier step: the result of a run that finished there
    before it was trained on (final-step-N), and that step's checkpoint."""
    kept = []
    if RunDir(run_dir).kept_final(step).is_dir():
        kept.append(f"its earlier result {RunDir(run_dir).kept_final(step)} is the {step}-step one")
    checkpoint = checkpoint_dir(run_dir, step)
    if (checkpoint / MARKER).is_file():
        kept.append(f"its checkpoint {checkpoint} holds the weights of step {step}")
    return "; ".join(kept) or f"no checkpoint of step {step} is kept"


def _reached(config: RunConfig, recorded: dict[str, Any] | None, finished: int) -> bool:
    """Whether the config asks for no more steps than the finished run made."""
    if config.train.max_steps is not None:
        return config.train.max_steps <= finished
    before = (recorded or {}).get("train", {})
    return before.get("max_steps") is None and config.train.epochs <= before.get("epochs", 1)


