"""No finished training without a result: when final/ cannot be written after the last
step, for any reason (a full disk, a result the method cannot write, a bug), the trained
weights are kept in a checkpoint of that step, and the message says where and how to
write final/ from it (the same command, which resumes at the last step and trains nothing).

The config refuses every combination known not to write its result (config/run.py,
training/setup.py); this is what keeps the weights when something else fails."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from difftune.errors import UserError


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
