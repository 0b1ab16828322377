"""One optimizer step of the loop: forward and backward over the accumulation window,
then clip and step, or skip a step whose loss or gradients are not finite (counted by
the NonFiniteGuard) and let fp16's scaler skip an overflowed one. The loop (loop.py)
decides when to step, save, validate and stop; this decides only what one step does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from difftune.config import TrainConfig
from difftune.processes import agreed
from difftune.training.checkpoint import TrainState
from difftune.training.events import EventLog
from difftune.training.guards import NonFiniteGuard
from difftune.training.step import Trainee, training_loss


@dataclass
class OptimizerSteps:
    train: TrainConfig
    accelerator: Accelerator
    trainee: Trainee
    optimizer: Any
    """accelerate's wrapped optimizer (its .optimizer is torch's)."""
    schedule: Any
    clipped: list[torch.nn.Parameter]
    """What clip_grad_norm_ sees (FSDP2: a prepared model's whole parameter list)."""
    nonfinite: NonFiniteGuard
    ema: Any
    events: EventLog
    window_bad: bool = False
    """A non-finite loss in the current accumulation window."""

    def micro_step(self, batch: dict[str, Any], state: TrainState) -> float:
        """Forward and backward; on the window's last micro-batch, the optimizer step.
        A non-finite loss anywhere in the accumulation window skips that whole step."""
        train, accelerator = self.train, self.accelerator
        with accelerator.accumulate(*self.trainee.trained.values()):
            loss = training_loss(self.trainee, batch, train.seed)
            finite = not agreed(accelerator, not bool(torch.isfinite(loss.detach()).all()))
            if finite:
                accelerator.backward(loss)
            self.window_bad |= not finite
            if accelerator.sync_gradients:
                self._optimizer_step(state)
                self.window_bad = False
            else:
                self.schedule.step()  # as accelerate expects on every micro-batch
        return accelerator.reduce(loss.detach(), reduction="mean").item() if finite else float("nan")

    def _optimizer_step(self, state: TrainState) -> None:
        """Clip and step, unless the window's loss or gradient norm was not finite: then
        the gradients are dropped, the step is skipped and counted."""
        train, accelerator = self.train, self.accelerator
        good = not self.window_bad
        if good:
            norm = accelerator.clip_grad_norm_(self.clipped, train.max_grad_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            good = norm is None or not agreed(accelerator, not bool(torch.isfinite(norm).all()))
            if not good and accelerator.scaler is not None:
                self._gradient_overflow(state)  # fp16: the loss scale was too high
                return
        if good:
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=train.set_grads_to_none)
            self.nonfinite.good()
            if self.ema is not None:
                self.ema.after_step(state.step + 1)
            return
        # accelerate's zero_grad does nothing off a sync step; clear the real optimizer's
        self.optimizer.optimizer.zero_grad(set_to_none=True)
        self.events.write("nonfinite", step=state.step + 1, in_a_row=self.nonfinite.in_a_row + 1,
                          total=self.nonfinite.total + 1)
        self.nonfinite.bad()

    def _gradient_overflow(self, state: TrainState) -> None:
        """fp16's loss scale overflowed (a finite loss, inf gradients after unscaling).
        The scaler's own step skips the update and lowers the scale; without it the
        scaler would never update and the next unscale would fail. This is normal early
        in fp16 training, so it is logged but not counted as a non-finite step."""
        self.optimizer.step()  # GradScaler: skipped, scale lowered
        self.nonfinite.overflow()
        self.schedule.step()  # accelerate skips it too when the optimizer step was skipped
        self.optimizer.zero_grad(set_to_none=self.train.set_grads_to_none)
        self.events.write("overflow", step=state.step + 1, scale=float(self.accelerator.scaler.get_scale()))
