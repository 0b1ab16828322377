"""Guards that keep a run from losing work: stop signals and non-finite losses."""

from __future__ import annotations

import torch

from difftune.errors import UserError


class NonFiniteLoss(UserError, RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss."""


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
    """Whether this process's trained weights are finite (its shards, when the model is
    sharded). Frozen weights cannot turn non-finite, and a quantized one (torchao's fp8)
    has no isfinite."""
    return all(bool(torch.isfinite(getattr(p, "_local_tensor", p)).all())
               for p in model.parameters() if p.requires_grad)
