"""The seam between the training loop and a training method."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from difftune.families.base import Family, ModelInputs, Parts
from difftune.method_settings import MethodSettings

Trained = dict[str, nn.Module]
"""The modules a method trains, by the name of the part they replace (the family's
denoiser and text encoders: "unet", "text_encoder_2", ...) or add ("controlnet"). The loop
swaps the prepared modules into the parts by these names (`Parts.with_modules`); the
name is also their folder in a checkpoint."""


class Method(Protocol):
    """A training method: what trains, what it adds to the model inputs, what it saves.

    A method is built from its [method] settings by its spec's factory (methods/<kind>/).
    """

    name: str
    needs_conditioning: bool
    """Whether batches carry a conditioning image."""
    floor_settings: dict[str, Any] | None
    """Generation settings that switch the method's effect off (the metric floor), if any."""
    card_tags: list[str]
    """Extra Hub tags for the model card."""
    fixed_caption: str | None
    """One prompt for every training image (DreamBooth), instead of a caption column."""
    result: str
    """What final/ holds: "pipeline", "lora" or "controlnet" (the family knows how each loads)."""

    def build(self, family: Family, parts: Parts) -> Trained:
        """Freeze what stays frozen and return the modules that train."""
        ...

    def training_data(
        self, family: Family, parts: Parts, trained: Trained, samples: Dataset, accelerator: Any
    ) -> Dataset:
        """The dataset the loop draws from, given the checked training rows (DreamBooth
        adds class images here, generating the missing ones)."""
        ...

    def condition(
        self, family: Family, parts: Parts, trained: Trained, batch: dict[str, Any], inputs: ModelInputs
    ) -> ModelInputs: ...

    def reduce(self, per_sample_loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor: ...

    def store(self, name: str, module: nn.Module, folder: Path) -> None:
        """Write one trained module's weights into a checkpoint folder."""
        ...

    def restore(self, name: str, module: nn.Module, folder: Path) -> None:
        """Load what `store` wrote back into the module, in place."""
        ...

    def save(self, family: Family, parts: Parts, trained: Trained, out_dir: Path) -> None:
        """Write the trained result in diffusers format."""
        ...

    def usage(self, family: Family, repo: str, base: str) -> str:
        """Python that loads the result with diffusers, for the model card."""
        ...

    def generate(
        self,
        family: Family,
        parts: Parts,
        trained: Trained,
        prompt: str | list[str],
        image: Image.Image | list[Image.Image] | None,
        settings: dict[str, Any],
        generator: torch.Generator,
    ) -> list[Image.Image]: ...


@dataclass(frozen=True)
class CleanInputs:
    """One step's inputs before any noise: what a method that owns its loss starts from."""

    latents: torch.Tensor
    """The clean latents (scaled, from the cache or the VAE)."""
    text: dict[str, torch.Tensor]
    """The family's prompt conditioning, by name."""
    geometry: torch.Tensor | None
    generators: list[torch.Generator]
    """One per sample (training/step.sample_generators): the method draws its noise and
    timesteps from them, so a sample draws the same in any batch, process or resumed run."""


@runtime_checkable
class OwnsLoss(Protocol):
    """A method whose loss is its own, not the denoising loss that the step builds from the
    objective, `condition` and `reduce` (distillation: the denoiser runs several times, as
    student, teacher and target, at timesteps the method draws). The step hands it the
    clean inputs and takes the scalar it returns."""

    def loss(self, family: Family, parts: Parts, trained: Trained, batch: dict[str, Any],
             clean: CleanInputs) -> torch.Tensor: ...


class FromSettings:
    """The Method members its settings already say (methods/<kind>/spec.py), read from
    them so that each trait is written once; `config` is the run's [method] settings."""

    def __init__(self, config: MethodSettings) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.kind

    @property
    def needs_conditioning(self) -> bool:
        return self.config.needs_conditioning

    @property
    def fixed_caption(self) -> str | None:
        return self.config.fixed_caption

    @property
    def result(self) -> str:
        return self.config.result


def freeze(parts: Parts) -> None:
    for module in parts.modules().values():
        module.requires_grad_(False)


def denoiser_and_text_encoders(parts: Parts, text_encoders: bool) -> dict[str, nn.Module]:
    """The parts a weight-changing method trains: the denoiser, and every text encoder
    when asked (by their part names)."""
    chosen = {parts.denoiser_name: parts.denoiser}
    if text_encoders:
        chosen |= {name: parts.components[name] for name in parts.trainable_text_encoders}
    return chosen


def trainable_fp32(module: nn.Module) -> nn.Module:
    """Trainable weights stay fp32; mixed precision comes from autocast, as in diffusers."""
    if any(p.dtype != torch.float32 for p in module.parameters()):
        module.to(torch.float32)
    return module.requires_grad_(True).train()


def store_pretrained(name: str, module: nn.Module, folder: Path) -> None:
    """A checkpoint's weights as a diffusers/transformers folder (from_pretrained reads it)."""
    module.save_pretrained(folder / name, safe_serialization=True)


def restore_pretrained(name: str, module: nn.Module, folder: Path) -> None:
    saved = type(module).from_pretrained(folder / name)
    module.load_state_dict(saved.state_dict())


@contextmanager
def evaluating(trained: Trained) -> Iterator[None]:
    """Eval mode for generation (no dropout), each module's mode restored after."""
    modes = {name: module.training for name, module in trained.items()}
    for module in trained.values():
        module.eval()
    try:
        yield
    finally:
        for name, module in trained.items():
            module.train(modes[name])


# The common case of three Method members, shared by the methods that add nothing there.
def same_samples(family: Family, parts: Parts, trained: Trained, samples: Dataset, accelerator: Any) -> Dataset:
    """training_data that trains on the checked rows as they are."""
    return samples


def no_extra_inputs(
    family: Family, parts: Parts, trained: Trained, batch: dict[str, Any], inputs: ModelInputs
) -> ModelInputs:
    """condition for a method that changes weights, not the denoiser's inputs."""
    return inputs


def family_usage(self: Any, family: Family, repo: str, base: str) -> str:
    """Method.usage: how the family's pipelines load this method's kind of result."""
    from difftune.results import result_of

    return result_of(self.result).usage(family, repo, base)


def mean_loss(per_sample_loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    return per_sample_loss.mean()
