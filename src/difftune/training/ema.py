"""An exponential moving average of the trained weights (diffusers' EMAModel), kept
beside training, saved in every checkpoint, and swapped in for validation and export.

Under FSDP2 the trained parameters are DTensors (each rank holds a shard) and so is
the average: each rank averages its own shards, with no communication. A checkpoint
holds the whole average (gathered by every rank; the main process writes it) and a
resumed run deals it out again, so a checkpoint does not depend on the sharding."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from difftune.method_settings import EmaSettings
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
        # Imported here: diffusers.training_utils imports every diffusers transformer
        # and torch's compiler (~1 s), which a run without an EMA does not need.
        from diffusers.training_utils import EMAModel

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
        """The averaged weights in the modules for a while, the trained ones back after
        (copies on the weights' own device: sharded weights stay sharded)."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for param, average in zip(self.params, self.average.shadow_params):
                param.copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, kept in zip(self.params, trained):
                    param.copy_(kept)

    # Saved by training.checkpoint as safetensors plus JSON, never through accelerate's
    # custom-state pickle: a checkpoint may come from anywhere, and reading a pickle runs
    # whatever it names. Every rank calls both (gathering a sharded average is a collective).
    def checkpoint_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The average's tensors, whole and contiguous, by name; and its counters (JSON)."""
        state = dict(self.average.state_dict())
        shadows = state.pop("shadow_params")
        tensors = {_shadow_name(i): whole(p).contiguous() for i, p in enumerate(shadows)}
        return tensors, state

    def restore_tensors(self, tensors: dict[str, torch.Tensor], counters: dict[str, Any]) -> None:
        """The inverse of checkpoint_tensors; a ValueError names what does not fit."""
        expected = [_shadow_name(i) for i in range(len(self.params))]
        if sorted(tensors) != expected:
            raise ValueError(f"it holds {len(tensors)} averaged tensors, this run trains {len(self.params)}")
        for name, param in zip(expected, self.params):
            if tensors[name].shape != param.shape:
                raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, the weight {tuple(param.shape)}")
        # The file is read onto the CPU; the average lives beside the weights.
        self.average.load_state_dict({**counters, "shadow_params": [tensors[name] for name in expected]})
        self.average.shadow_params = [placed_like(p, param) for p, param in zip(self.average.shadow_params, self.params)]


def _shadow_name(index: int) -> str:
    return f"shadow_params.{index:05d}"


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective), on the CPU; a plain one as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor().cpu() if isinstance(tensor, DTensor) else tensor


def placed_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor sharded as `param` is (a collective when it is), or moved beside it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
    return tensor.to(param.device)
