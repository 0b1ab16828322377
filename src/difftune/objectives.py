"""Noise, timesteps, regression targets and per-sample loss weights for denoising training.

Every random draw is made per sample, from that sample's own generator (seeded by where
the sample sits in the data, see training/step.py). So a sample gets the same noise
whatever batch it is in: a resumed run, a run split over more processes, or a
DreamBooth batch with class images appended all see identical noise per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from difftune.config import ObjectiveConfig


@dataclass(frozen=True)
class NoisedBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


class Objective(Protocol):
    """What a denoiser learns: noise the clean latents, say what to predict and how much
    each sample's error counts. The family chooses it (`Family.objective`); the step
    never names a class."""

    def sample(self, latents: torch.Tensor, generators: list[torch.Generator]) -> NoisedBatch: ...


class DiscreteDiffusion:
    """DDPM-style training (Ho et al. 2020): t ~ U{0..T-1}, x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps.

    The target is eps, or v = sqrt(a_t) eps - sqrt(1-a_t) x0 (Salimans & Ho 2022), as the
    scheduler's prediction_type says (or the config overrides; the scheduler is then
    updated so saved pipelines sample with the type they were trained for).
    """

    def __init__(self, scheduler: Any, options: ObjectiveConfig | None = None) -> None:
        self.options = options or ObjectiveConfig()
        if self.options.prediction_type is not None:
            scheduler.register_to_config(prediction_type=self.options.prediction_type)
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def sample(self, latents: torch.Tensor, generators: list[torch.Generator]) -> NoisedBatch:
        latents = latents.float()
        timesteps, noise, input_noise = self._draw(latents, generators)
        noisy = self.scheduler.add_noise(latents, input_noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        return NoisedBatch(noisy, timesteps, target, self._weight(timesteps))

    def _draw(
        self, latents: torch.Tensor, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per sample, in a fixed order: timestep, noise, offset, perturbation."""
        steps = self.scheduler.config.num_train_timesteps
        shape, device = latents.shape[1:], latents.device
        offset, perturbation = self.options.noise_offset, self.options.input_perturbation
        timesteps, noise, input_noise = [], [], []
        for generator in generators:
            timesteps.append(torch.randint(0, steps, (1,), generator=generator, device=device))
            eps = torch.randn(shape, generator=generator, device=device)
            if offset:  # one shift per channel (Guttenberg 2023)
                eps = eps + offset * torch.randn((shape[0], 1, 1), generator=generator, device=device)
            noise.append(eps)
            if perturbation:
                eps = eps + perturbation * torch.randn(shape, generator=generator, device=device)
            input_noise.append(eps)
        return torch.cat(timesteps).long(), torch.stack(noise), torch.stack(input_noise)

    def _weight(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma: min(SNR, gamma) / SNR for eps, / (SNR + 1) for v."""
        gamma = self.options.snr_gamma
        if gamma is None:
            return torch.ones(timesteps.shape[0], device=timesteps.device)
        # lazily: see training_utils in training/ema.py
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, timesteps).float()
        clipped = torch.minimum(snr, torch.full_like(snr, gamma))
        denominator = snr if self.prediction_type == "epsilon" else snr + 1
        # A zero-terminal-SNR schedule has SNR 0 at its last step: weight 1 there, as diffusers does.
        return torch.where(denominator == 0, torch.ones_like(snr), clipped / denominator.clamp_min(1e-12))


class FlowMatching:
    """Rectified flow (Liu et al. 2022; Esser et al. 2024, "Scaling Rectified Flow
    Transformers", the SD3 paper): x_t = (1 - s) x0 + s eps, and the denoiser predicts
    the velocity eps - x0. The model is given t = s * num_train_timesteps, as diffusers'
    FlowMatchEulerDiscreteScheduler counts time.

    s is drawn per sample by `options.timestep_sampling` (sec. 3.1 of the SD3 paper:
    uniform; logit-normal, sigmoid of N(mean, std); mode with a scale; cosmap), then
    shifted as the base's scheduler config says: a static `shift` (s' = k s / (1 + (k-1) s),
    eq. 23) or, with `use_dynamic_shifting`, by mu from the image's token count
    (`shift_mu`, the family's rule: Flux interpolates linearly between base and max
    shift, CogView4 grows with the square root) through the scheduler's own time_shift.
    The loss weight is none, sigma^-2 or cosmap (`options.loss_weighting`).
    """

    def __init__(self, scheduler: Any, options: ObjectiveConfig | None = None,
                 shift_mu: Callable[[int], float] | None = None, patch_size: int = 1) -> None:
        self.options = options or ObjectiveConfig()
        self.scheduler = scheduler
        self.config = scheduler.config
        self.shift_mu = shift_mu
        self.patch_size = patch_size
        if self.config.use_dynamic_shifting and shift_mu is None:
            raise ValueError("the scheduler shifts by image size (use_dynamic_shifting) and the family gave no rule")

    def draw_time(self, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """One sample's time in (0, 1), before the shift."""
        options = self.options
        if options.timestep_sampling == "cosmap":  # the SD3 paper's eq. 21: t = 1 - 1 / (tan(pi u / 2) + 1)
            u = torch.rand((1,), generator=generator, device=device)
            return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
        # lazily, as compute_snr
        from diffusers.training_utils import compute_density_for_timestep_sampling

        return compute_density_for_timestep_sampling(
            options.timestep_sampling, 1, logit_mean=options.logit_mean, logit_std=options.logit_std,
            mode_scale=options.mode_scale, device=device, generator=generator)

    def shift(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if self.config.use_dynamic_shifting:
            tokens = (height // self.patch_size) * (width // self.patch_size)
            return self.scheduler.time_shift(self.shift_mu(tokens), 1.0, t)
        k = self.config.shift
        return k * t / (1 + (k - 1) * t)

    def sample(self, latents: torch.Tensor, generators: list[torch.Generator]) -> NoisedBatch:
        latents = latents.float()
        shape, device = latents.shape[1:], latents.device
        times, noise = [], []
        for generator in generators:  # per sample, in a fixed order: time, noise, offset
            times.append(self.draw_time(generator, device))
            eps = torch.randn(shape, generator=generator, device=device)
            if self.options.noise_offset:
                eps = eps + self.options.noise_offset * torch.randn((shape[0], 1, 1), generator=generator,
                                                                    device=device)
            noise.append(eps)
        # t = 0 or 1 exactly would make the shift divide by zero or the weight infinite
        sigmas = self.shift(torch.cat(times).clamp(1e-5, 1 - 1e-5), *shape[-2:])
        eps = torch.stack(noise)
        s = sigmas.view(-1, *[1] * len(shape))
        noisy = (1 - s) * latents + s * eps
        # lazily, as compute_snr
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        weight = compute_loss_weighting_for_sd3(self.options.loss_weighting, sigmas).float()
        return NoisedBatch(noisy, sigmas * self.config.num_train_timesteps, eps - latents, weight)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every dimension but the batch, in fp32."""
    error = (prediction.float() - target.float()) ** 2
    return error.flatten(1).mean(dim=1)
