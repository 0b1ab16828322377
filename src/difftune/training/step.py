"""One training step, written once for every family and method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difftune.families.base import Family, ModelInputs, Parts
from difftune.methods.base import Method, Trained
from difftune.objectives import DiscreteDiffusion, per_sample_mse


@dataclass
class Trainee:
    """Everything a step needs: the family adapter, loaded parts, method and objective."""

    family: Family
    parts: Parts
    method: Method
    objective: DiscreteDiffusion
    trained: Trained
    step_parts: Parts | None = None
    """The parts the step runs with (the method may swap in the prepared modules)."""

    @property
    def trains_text_encoder(self) -> bool:
        return "text_encoder" in self.trained


def sample_generators(device: torch.device, seed: int, keys: list[tuple[int, ...]]) -> list[torch.Generator]:
    """One generator per sample, seeded by where the sample sits in the data (epoch,
    index, role). Its noise and timestep then do not depend on the batch it is in, the
    process that runs it, or whether the run was resumed. (Tuples of ints hash the same
    in every process.)"""
    return [torch.Generator(device).manual_seed(hash((seed, *key)) & 0x7FFF_FFFF_FFFF) for key in keys]


def training_loss(trainee: Trainee, batch: dict[str, Any], seed: int) -> torch.Tensor:
    family, method = trainee.family, trainee.method
    parts = trainee.step_parts or trainee.parts
    # The denoiser's device: with a latent cache the VAE may have left the accelerator.
    device = next(parts.denoiser.parameters()).device
    generators = sample_generators(device, seed, batch["keys"])
    with torch.no_grad():
        if "latent_mean" in batch:  # from the latent cache
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            latents = family.sample_latents(parts, mean, std, generators)
        else:
            latents = family.encode_images(parts, batch["pixels"], generators)
    if "text" in batch:  # from the text cache
        text = batch["text"].to(device)
    else:
        with torch.set_grad_enabled(trainee.trains_text_encoder):
            text = family.encode_prompts(parts, batch["captions"])
    noised = trainee.objective.sample(latents, generators)
    inputs = ModelInputs(noised.noisy, noised.timesteps, text)
    inputs = method.condition(family, parts, trainee.trained, batch, inputs)
    prediction = family.predict(parts, inputs)
    per_sample = noised.weight * per_sample_mse(prediction, noised.target)
    return method.reduce(per_sample, batch)
