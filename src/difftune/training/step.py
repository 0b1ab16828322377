"""One training step, written once for every family and method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from difftune.families.base import Family, ModelInputs, Parts
from difftune.methods.base import Method
from difftune.objectives import DiscreteDiffusion, per_sample_mse


@dataclass
class Trainee:
    """Everything a step needs: the family adapter, loaded parts, method and objective."""

    family: Family
    parts: Parts
    method: Method
    objective: DiscreteDiffusion
    model: nn.Module
    step_parts: Parts | None = None
    """The parts the step runs with (the method may swap in the prepared model)."""


def step_generator(device: torch.device, seed: int, epoch: int, batch: int, rank: int) -> torch.Generator:
    """Noise and timesteps depend only on where the step is, so resume replays them."""
    return torch.Generator(device).manual_seed(hash((seed, epoch, batch, rank)) & 0x7FFF_FFFF_FFFF)


def training_loss(trainee: Trainee, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
    family, method = trainee.family, trainee.method
    parts = trainee.step_parts or trainee.parts
    with torch.no_grad():
        latents = family.encode_images(parts, batch["pixels"], generator)
        text = family.encode_prompts(parts, batch["captions"])
    noised = trainee.objective.sample(latents, generator)
    inputs = ModelInputs(noised.noisy, noised.timesteps, text)
    inputs = method.condition(family, parts, trainee.model, batch, inputs)
    prediction = family.predict(parts, inputs)
    per_sample = noised.weight * per_sample_mse(prediction, noised.target)
    return method.reduce(per_sample, batch)
