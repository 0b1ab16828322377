"""One training step, written once for every family and method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difftune.families.base import Family, ModelInputs, Parts
from difftune.methods.base import CleanInputs, Method, OwnsLoss, Trained
from difftune.objectives import NoisedBatch, Objective, per_sample_mse


@dataclass
class Trainee:
    """Everything a step needs: the family adapter, loaded parts, method and objective."""

    family: Family
    parts: Parts
    method: Method
    objective: Objective
    trained: Trained
    step_parts: Parts | None = None
    """The parts with the prepared (possibly DDP-wrapped) trained modules swapped in, so
    the step calls the modules whose gradients are synchronised."""

    @property
    def trains_text_encoder(self) -> bool:
        return any(name in self.trained for name in self.parts.text_encoder_names)


def sample_generators(device: torch.device, seed: int, keys: list[tuple[int, ...]]) -> list[torch.Generator]:
    """One generator per sample, seeded by where the sample sits in the data (epoch,
    index, role). Its noise and timestep then do not depend on the batch it is in, the
    process that runs it, or whether the run was resumed. (Tuples of ints hash the same
    in every process.)"""
    return [torch.Generator(device).manual_seed(hash((seed, *key)) & 0x7FFF_FFFF_FFFF) for key in keys]


def denoiser_inputs(trainee: Trainee, batch: dict[str, Any], seed: int) -> tuple[ModelInputs, NoisedBatch]:
    """Everything before the denoiser: clean_inputs, then the objective's noise and timesteps."""
    clean = clean_inputs(trainee, batch, seed)
    noised = trainee.objective.sample(clean.latents, clean.generators)
    return ModelInputs(noised.noisy, noised.timesteps, clean.text, clean.geometry), noised


def clean_inputs(trainee: Trainee, batch: dict[str, Any], seed: int) -> CleanInputs:
    """Latents (from the cache or the VAE), prompt embeddings (from the cache or the text
    encoders), geometry and each sample's generator."""
    family = trainee.family
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
        text = {name: tensor.to(device) for name, tensor in batch["text"].items()}
    else:
        with torch.set_grad_enabled(trainee.trains_text_encoder):
            text = family.encode_prompts(parts, batch["captions"])
    geometry = batch["geometry"].to(device) if "geometry" in batch else None
    return CleanInputs(latents, text, geometry, generators)


def training_loss(trainee: Trainee, batch: dict[str, Any], seed: int) -> torch.Tensor:
    family, method = trainee.family, trainee.method
    parts = trainee.step_parts or trainee.parts
    if isinstance(method, OwnsLoss):  # distillation: its own passes and target (methods/base.OwnsLoss)
        return method.loss(family, parts, trainee.trained, batch, clean_inputs(trainee, batch, seed))
    inputs, noised = denoiser_inputs(trainee, batch, seed)
    inputs = method.condition(family, parts, trainee.trained, batch, inputs)
    prediction = family.predict(parts, inputs)
    per_sample = noised.weight * per_sample_mse(prediction, noised.target)
    return method.reduce(per_sample, batch)
