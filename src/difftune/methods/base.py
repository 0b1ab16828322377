"""The seam between the training loop and a training method."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from difftune.config import MethodConfig
from difftune.families.base import Family, ModelInputs, Parts


class Method(Protocol):
    """A training method: what trains, what it adds to the model inputs, what it saves."""

    name: str
    needs_conditioning: bool
    """Whether batches carry a conditioning image."""
    weights_subfolder: str
    """Where a checkpoint keeps the trained weights in diffusers format."""
    floor_settings: dict[str, Any] | None
    """Generation settings that switch the method's effect off (the metric floor), if any."""
    card_tags: list[str]
    """Extra Hub tags for the model card."""

    def usage(self, repo: str, base: str) -> str:
        """Python that loads the result with diffusers, for the model card."""
        ...

    def build(self, family: Family, parts: Parts, config: MethodConfig) -> nn.Module:
        """Freeze what stays frozen and return the module that trains."""
        ...

    def training_parts(self, parts: Parts, model: nn.Module) -> Parts:
        """The parts the step runs with, given the accelerate-prepared trainable model."""
        ...

    def condition(
        self, family: Family, parts: Parts, model: nn.Module, batch: dict[str, Any], inputs: ModelInputs
    ) -> ModelInputs: ...

    def reduce(self, per_sample_loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor: ...

    def save(self, family: Family, parts: Parts, model: nn.Module, out_dir: Path) -> None:
        """Write the trained result in diffusers format."""
        ...

    def generate(
        self,
        family: Family,
        parts: Parts,
        model: nn.Module,
        prompt: str | list[str],
        image: Image.Image | list[Image.Image] | None,
        settings: dict[str, Any],
        generator: torch.Generator,
    ) -> list[Image.Image]: ...
