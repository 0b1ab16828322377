"""Guards that keep a run from losing work or ending as if it had trained: non-finite
steps (skipped, counted, and a run that trained no step refused), and rows that cannot
be trained on, met while training (the loop checkpoints, then stops with their sentence)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from rich.console import Console
from rich.markup import escape

from difftune.errors import DataError, UserError
from difftune.processes import agreed
from difftune.training.events import EventLog

HINT = 'lower train.learning_rate, or use train.mixed_precision = "bf16" instead of "fp16"'


class NonFiniteLoss(UserError, RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss."""


class NoStepTrained(NonFiniteLoss):
    """Every optimizer step of the run was skipped: its weights are where it started."""


class NonFiniteGuard:
    """Counts steps whose loss is NaN or infinite; too many in a row ends the run. Also
    counts the steps that trained and fp16's overflow steps, to say at the end what
    the run skipped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0
        self.trained = 0
        self.overflowed = 0

    def good(self) -> None:
        self.in_a_row = 0
        self.trained += 1

    def overflow(self) -> None:
        """fp16's loss scale overflowed: the scaler skipped the update (normal early on)."""
        self.overflowed += 1

    def bad(self) -> None:
        """Count a skipped optimizer step; raise when there were too many in a row."""
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.limit:
            raise NonFiniteLoss(
                f"{self.in_a_row} steps in a row had a non-finite loss (train.max_nonfinite_steps = "
                f"{self.limit}); stopping. Checkpoints hold only finite weights. A resumed run keeps the "
                "settings it was trained with, so lower train.learning_rate or use bf16 instead of fp16 in a "
                "new run (another train.output_dir)."
            )

    def counts(self) -> dict[str, int]:
        return {"trained": self.trained, "nonfinite": self.total, "overflow": self.overflowed}

    def skipped_line(self) -> str | None:
        """At the end of a run: what it skipped, in a line ("warning: ..." when that was
        most of its steps), or None when it skipped nothing. A run that skipped every
        step raises NoStepTrained: its final/ would be the weights it started from."""
        skipped = self.total + self.overflowed
        steps = self.trained + skipped
        if not skipped:
            return None
        kinds = ", ".join(f"{n} for {why}" for n, why in ((self.total, "a NaN or infinite loss or gradient"),
                                                          (self.overflowed, "fp16 overflow")) if n)
        if not self.trained:
            raise NoStepTrained(
                f"no optimizer step trained: all {steps} steps of this run were skipped ({kinds}), so final/ was "
                "not written; the weights it started from already give a non-finite loss or gradient: check "
                "model.pretrained (and the checkpoint it resumed from, if any), use train.mixed_precision = "
                '"bf16" or "no" instead of "fp16", or lower train.learning_rate')
        line = f"{skipped} of {steps} optimizer steps were skipped ({kinds}); events.jsonl lists each"
        return f"warning: {line}: the run barely trained; {HINT}" if 2 * skipped > steps else line


def log_skipped_steps(guard: NonFiniteGuard, events: EventLog, console: Console, main: bool) -> None:
    """After the last step: the steps skipped (a non-finite loss or gradient, fp16
    overflow), recorded and said in one line, a warning when they were most. A run that
    skipped every step stops here (NoStepTrained), before final/ and "done"."""
    counts = guard.counts()
    if counts["nonfinite"] or counts["overflow"]:
        events.write("skipped_steps", **counts)
    line = guard.skipped_line()
    if line and main:
        warning = line.startswith("warning: ")
        shown = f"[yellow]warning:[/yellow] {escape(line.removeprefix('warning: '))}" if warning else escape(line)
        console.print(shown, highlight=False, soft_wrap=True)


def all_finite(model: torch.nn.Module) -> bool:
    """Whether this process's trained weights are finite (its shards, when the model is
    sharded). Frozen weights cannot turn non-finite, and a quantized one (torchao's fp8)
    has no isfinite."""
    return all(bool(torch.isfinite(getattr(p, "_local_tensor", p)).all())
               for p in model.parameters() if p.requires_grad)


class BadRowStop(DataError):
    """A row that cannot be trained on, met while training; every process raises it at
    the same batch (so they can checkpoint together before stopping)."""

    def kept_at(self, step: int) -> BadRowStop:
        """The sentence the run ends with: the row's, then where its work is."""
        if step == 0:
            return BadRowStop(f"{self}. Nothing had trained yet: put the file right, then run the same command again")
        return BadRowStop(f"{self}. The run stopped at step {step}, which its last checkpoint holds: put the file "
                          "right (a good copy in its place), then run the same command again to resume from there")


class StepMark:
    """Where the last finished optimizer step left the run: its state, accelerate's count
    of micro-batches and the process's random states (what save_state records). A bad row
    met half-way through an accumulation window is saved as that step, not as the window's
    first micro-batches (which counted, and drew from the random states), so the resumed
    run trains on exactly as a run that never stopped."""

    def __init__(self, state: Any, accelerator: Accelerator) -> None:
        self.state = dataclasses.replace(state)
        self.accelerator, self.micro_batches = accelerator, accelerator.step
        self.randomness = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                           torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)

    def restore(self) -> Any:
        """The step's state, its random states put back (the run is stopping)."""
        self.accelerator.step = self.micro_batches  # when the next window's optimizer step falls
        python, numpy, cpu, cuda = self.randomness
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        return self.state


def batches_until_a_bad_row(loader: Iterable[Any], accelerator: Accelerator) -> Iterator[Any]:
    """The loader's batches, until a row that cannot be trained on (a DataError) on any
    process: then BadRowStop on every process, with that row's sentence (or, on the
    others, one saying another process met it)."""
    batches = iter(loader)
    while True:
        problem = None
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataError as error:
            problem = own_sentence(error)
        if agreed(accelerator, problem is not None):
            raise BadRowStop(problem or "another process of the run met a row that cannot be trained on (its "
                                        "message names it)")
        yield batch


def own_sentence(error: DataError) -> str:
    """The error's own sentence: a DataLoader worker's error reaches the main process as
    "Caught DataError in DataLoader worker ... Original Traceback ...", the sentence last."""
    text = str(error)
    marker = f"{type(error).__name__}: "
    if text.startswith("Caught ") and "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text

