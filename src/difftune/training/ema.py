"""An exponential moving average of the trained weights (diffusers' EMAModel), kept
beside training, saved in every checkpoint, and swapped in for validation and export."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffusers.training_utils import EMAModel

from difftune.config import EmaSettings
from difftune.methods.base import Trained


class WeightAverage:
    """EMA over every trainable parameter of the trained modules.

    The decay for the n-th update (n counts updates, one per `update_every` steps once
    `start_step` is past) is min(decay, (1 + n) / (10 + n)), or with warmup
    1 - (1 + n / inv_gamma) ** -power, and never below min_decay.
    """

    def __init__(self, trained: Trained, settings: EmaSettings) -> None:
        self.params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
        self.settings = settings
        self.average = EMAModel(
            self.params,
            decay=settings.decay,
            min_decay=settings.min_decay,
            use_ema_warmup=settings.warmup,
            inv_gamma=settings.inv_gamma,
            power=settings.power,
        )

    def after_step(self, step: int) -> None:
        """Called after optimizer step `step` (1-based)."""
        if step > self.settings.start_step and step % self.settings.update_every == 0:
            self.average.step(self.params)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the modules for a while, the trained ones back after."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    # accelerate's register_for_checkpointing saves and loads these.
    def state_dict(self) -> dict[str, Any]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # accelerate loads custom state onto the CPU; the average lives beside the weights.
        self.average.load_state_dict(state)
        self.average.to(device=self.params[0].device)
