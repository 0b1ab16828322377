"""The flow-matching objective against values worked out by hand: the SD3 paper's time
sampling schemes, the static and size-dependent shifts, the interpolation, the velocity
target and the loss weights."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from difftune.config import ObjectiveConfig
from difftune.objectives import FlowMatching


def _objective(shift: float = 1.0, dynamic: bool = False, shift_type: str = "exponential", mu: float = 0.0,
               patch_size: int = 1, **options) -> FlowMatching:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic, time_shift_type=shift_type)
    seen = []

    def shift_mu(tokens: int) -> float:
        seen.append(tokens)
        return mu

    objective = FlowMatching(scheduler, ObjectiveConfig(**options), shift_mu if dynamic else None, patch_size)
    objective.seen_tokens = seen
    return objective


def _first_uniform(seed: int) -> float:
    return torch.rand((1,), generator=torch.Generator().manual_seed(seed)).item()


def test_static_shift_noisy_latents_target_and_timesteps() -> None:
    objective = _objective(shift=3.0)
    latents = torch.full((2, 4, 2, 2), 0.5)
    noised = objective.sample(latents, [torch.Generator().manual_seed(seed) for seed in (0, 1)])
    for row, seed in enumerate((0, 1)):
        generator = torch.Generator().manual_seed(seed)
        u = torch.rand((1,), generator=generator).item()
        eps = torch.randn((4, 2, 2), generator=generator)
        sigma = 3 * u / (1 + 2 * u)  # eq. 23 of the SD3 paper with shift 3
        assert noised.timesteps[row].item() == pytest.approx(1000 * sigma, rel=1e-5)
        torch.testing.assert_close(noised.noisy[row], (1 - sigma) * 0.5 + sigma * eps)
        torch.testing.assert_close(noised.target[row], eps - 0.5)
    assert noised.weight.tolist() == [1.0, 1.0]


def test_shift_values() -> None:
    assert _objective(shift=3.0).shift(torch.tensor([0.5]), 8, 8).item() == pytest.approx(0.75)
    assert _objective(shift=1.0).shift(torch.tensor([0.3]), 8, 8).item() == pytest.approx(0.3)
    # exponential (Flux): e^mu / (e^mu + 1/t - 1); mu = ln 2, t = 0.5 -> 2/3
    exponential = _objective(dynamic=True, mu=math.log(2.0), patch_size=2)
    assert exponential.shift(torch.tensor([0.5]), 8, 12).item() == pytest.approx(2 / 3)
    assert exponential.seen_tokens == [4 * 6]  # 2x2 patches of an 8x12 latent
    # linear (CogView4): mu / (mu + 1/t - 1); mu = 3, t = 0.25 -> 3/6
    linear = _objective(dynamic=True, shift_type="linear", mu=3.0)
    assert linear.shift(torch.tensor([0.25]), 4, 4).item() == pytest.approx(0.5)


def test_time_sampling_schemes() -> None:
    u = _first_uniform(7)
    draw = {scheme: _objective(timestep_sampling=scheme, mode_scale=0.5).draw_time(
        torch.Generator().manual_seed(7), torch.device("cpu")).item() for scheme in ("uniform", "mode", "cosmap")}
    assert draw["uniform"] == pytest.approx(u)
    # mode (SD3 eq. 20): 1 - u - s (cos^2(pi u / 2) - 1 + u)
    assert draw["mode"] == pytest.approx(1 - u - 0.5 * (math.cos(math.pi * u / 2) ** 2 - 1 + u), rel=1e-5)
    # cosmap (SD3 eq. 21): 1 - 1 / (tan(pi u / 2) + 1)
    assert draw["cosmap"] == pytest.approx(1 - 1 / (math.tan(math.pi * u / 2) + 1), rel=1e-5)
    # logit-normal: sigmoid of N(mean, std)
    z = torch.normal(0.7, 0.4, (1,), generator=torch.Generator().manual_seed(7)).item()
    logit = _objective(timestep_sampling="logit_normal", logit_mean=0.7, logit_std=0.4)
    drawn = logit.draw_time(torch.Generator().manual_seed(7), torch.device("cpu")).item()
    assert drawn == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-5)


def test_loss_weights() -> None:
    latents = torch.zeros(1, 1, 2, 2)
    u = _first_uniform(3)
    for weighting, expected in (("none", 1.0), ("sigma_sqrt", u ** -2), ("cosmap", 2 / (math.pi * (1 - 2 * u + 2 * u * u)))):
        noised = _objective(loss_weighting=weighting).sample(latents, [torch.Generator().manual_seed(3)])
        assert noised.weight.item() == pytest.approx(expected, rel=1e-5), weighting


def test_a_dynamic_scheduler_needs_the_family_rule() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowMatching(scheduler, ObjectiveConfig())
