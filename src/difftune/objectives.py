"""Noise, timesteps and regression targets for denoising training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class NoisedBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


class DiscreteDiffusion:
    """DDPM-style training (Ho et al. 2020): t ~ U{0..T-1}, x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps.

    The target is eps, or v = sqrt(a_t) eps - sqrt(1-a_t) x0 (Salimans & Ho 2022), as the
    scheduler's prediction_type says.
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def sample(self, latents: torch.Tensor, generator: torch.Generator) -> NoisedBatch:
        latents = latents.float()
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(
            0, steps, (latents.shape[0],), generator=generator, device=latents.device
        ).long()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        weight = torch.ones(latents.shape[0], device=latents.device)
        return NoisedBatch(noisy, timesteps, target, weight)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dimension but the batch, in fp32."""
    error = (prediction.float() - target.float()) ** 2
    return error.flatten(1).mean(dim=1)
