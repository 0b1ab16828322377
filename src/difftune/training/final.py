"""final/, the run's result: written whole or not at all, an earlier one kept, and never a
finished training without a result: when final/ cannot be written after the last step, for any reason (a full disk, a result the method cannot write, a bug), the trained
weights are kept in a checkpoint of that step, and the message says where and how to
write final/ from it (the same command, which resumes at the last step and trains nothing).

The config refuses every combination known not to write its result (config/run.py,
training/setup.py); this is what keeps the weights when something else fails."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from difftune.errors import UserError
from difftune.files import discard, publish, staging_path
from difftune.rundir import RunDir
from difftune.training.checkpoint import DiskSpaceError


class FinalNotWritten(UserError):
    """final/ could not be written; the message says which checkpoint holds the weights."""


def attempt(save: Callable[[], None]) -> BaseException | None:
    """Run `save` (the main process writing final/); the exception it raised, or None.
    A stop request (KeyboardInterrupt) is not caught: a checkpoint is written on the way out."""
    try:
        save()
    except Exception as error:  # noqa: BLE001 (whatever it is, the weights are kept before it is raised)
        return error
    return None


def keep_weights_and_raise(failure: BaseException | None, step: int, checkpoint: Path, already_saved: bool,
                           write_checkpoint: Callable[[], None], events: Any) -> NoReturn:
    """Every process: write the step's checkpoint (unless it is written), then raise
    FinalNotWritten naming it. `failure` is the main process's exception (None elsewhere);
    its traceback goes to the run's events.jsonl, since the message alone hides a bug's."""
    if failure is not None:
        events.write("final_failed", step=step, error=f"{type(failure).__name__}: {failure}",
                     traceback="".join(traceback.format_exception(failure)))
    if not already_saved:
        write_checkpoint()
    if isinstance(failure, UserError):  # its own sentence (a full disk), with where the weights are
        failure.args = (f"{failure} (the trained weights: {checkpoint}; the same command writes final/ from it "
                        "and trains nothing again)",)
        raise failure
    why = f"{type(failure).__name__}: {failure}" if failure is not None else "on the main process"
    raise FinalNotWritten(
        f"training finished at step {step}, but final/ could not be written ({why}). The trained weights are "
        f"in {checkpoint}: once the cause is fixed, run the same command again to write final/ from it "
        "(nothing is trained again); the traceback is in the run's events.jsonl (event final_failed)."
    ) from failure


def finished_step(run_dir: Path) -> int | None:
    """The step final/ was written at, if the run finished (its last "final" event) and
    final/ still holds weights; None otherwise (the run then writes final/ again)."""
    run = RunDir(run_dir)
    if not run.final.is_dir() or not any(f.suffix in (".safetensors", ".bin") for f in run.final.rglob("*")):
        return None
    steps = [event.get("step") for event in run.read_events() if event["event"] == "final"]
    return next((step for step in reversed(steps) if type(step) is int), None)


def write_final(run_dir: Path, step: int, save: Callable[[Path], None]) -> Path:
    """final/, written whole or not at all: `save` writes into a staging folder that is
    published once complete. A final/ of an earlier, shorter run is kept as final-step-N;
    a failed write (a full disk) leaves nothing behind and says where the weights are."""
    final = RunDir(run_dir).final
    staging = staging_path(final)
    discard(staging)
    try:
        save(staging)
    except OSError as error:
        discard(staging)
        raise DiskSpaceError(f"final/ could not be written ({error}); the run's last checkpoint holds "
                             "its weights: free some space and run the same command again") from error
    publish(staging, final, _kept_name(run_dir, step))
    return final


def _kept_name(run_dir: Path, step: int) -> Path | None:
    """Where an existing final/ goes when a new one replaces it: final-step-N for the
    step it was written at, or final-replaced-TIME when the events no longer say (the
    log damaged or deleted); None only for a final/ of this very step (written again)."""
    if not RunDir(run_dir).final.exists():
        return None
    earlier = finished_step(run_dir)
    if earlier == step:
        return None
    if earlier is not None:
        return RunDir(run_dir).kept_final(earlier)
    return run_dir / f"final-replaced-{time.strftime('%Y%m%d-%H%M%S')}"
