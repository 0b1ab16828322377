"""Guards that keep a run from losing work: stop signals and non-finite losses."""

from __future__ import annotations

from collections import deque

import torch
from accelerate import Accelerator

from difftune.errors import UserError


class NonFiniteLoss(UserError, RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss."""


_RECENT: deque[torch.Tensor] = deque(maxlen=16)
"""The last tensors `agreed` reduced, kept alive from Python. gloo's worker thread
destroys a finished collective (and the next barrier, which holds it) on its own; if it
drops the last reference to a tensor that Python made, it must take the GIL, and at
teardown the main thread holds the GIL while it joins that worker: a deadlock (seen 1 run
in 3 of a 2-process CPU job). A tensor Python still holds is never freed by the worker."""


def agreed(accelerator: Accelerator, flag: bool) -> bool:
    """True when the flag is set on any process, so every rank takes the same branch."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    reduced = accelerator.reduce(value, reduction="sum")
    _RECENT.extend((value, reduced))
    return bool(reduced.item() > 0)


class NonFiniteGuard:
    """Counts steps whose loss is NaN or infinite; too many in a row ends the run."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def good(self) -> None:
        self.in_a_row = 0

    def bad(self) -> None:
        """Count a skipped optimizer step; raise when there were too many in a row."""
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row > self.limit:
            raise NonFiniteLoss(
                f"{self.in_a_row} steps in a row had a non-finite loss (train.max_nonfinite_steps = "
                f"{self.limit}); stopping. Checkpoints hold only finite weights: lower "
                "train.learning_rate or use bf16 instead of fp16, then resume."
            )


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
