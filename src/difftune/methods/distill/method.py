"""Latent consistency distillation into a LoRA (LCM-LoRA: Luo et al. 2023, "Latent
Consistency Models" and "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module"), as
diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py and
train_lcm_distill_lora_sdxl.py train it. One step (Algorithm 1 of the LCM paper, EMA-free):

1. a DDIM solver over num_ddim_timesteps skips k = T // num_ddim_timesteps: each sample
   draws an index n of its grid (T - 1, T - k - 1, ...), t_{n+k} = that timestep and
   t_n = t_{n+k} - k (0 at the first), and a guidance w ~ U[w_min, w_max];
2. the latents are noised at t_{n+k} (z = sqrt(a) x0 + sqrt(1 - a) eps; with
   start_from_noise, z = eps at the grid's top, where sampling starts);
3. the student (the denoiser with its adapters) predicts there; its x0 estimate goes
   through the consistency boundary condition: c_skip z + c_out x0 (sigma_data 0.5, times
   scaled by timestep_scaling), as LCMScheduler samples;
4. the teacher (the same denoiser, its adapters switched off: no second copy) predicts for
   the prompt and for the empty one (the family's encoding of "": SD's "" embedding,
   SDXL's zeros), mixes x0 and eps as cond + w (cond - uncond), and takes one DDIM step to
   t_n (or teacher_substeps evenly spaced ones);
5. the target is the student itself at t_n with the boundary condition, without a
   gradient (no EMA target network, as the LoRA scripts); at t_n = 0 that is the teacher's
   sample itself;
6. the loss is pseudo-Huber sqrt(d^2 + c^2) - c or the squared error, averaged.
With target = "trajectory" (trajectory_loss), steps 4-5 are one guided teacher chain per
group of num_ddim_timesteps samples, from the grid's top to 0: each sample of the group
starts at one of its points and learns its end (the exact target, not the student's guess).
final/ is the LoRA file the family's pipeline loads (load_lora_weights), sampled with
LCMScheduler in 4 steps at guidance 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from difftune.families.base import Family, ModelInputs, Parts
from difftune.methods.base import (
    CleanInputs,
    FromSettings,
    Trained,
    family_usage,
    mean_loss,
    no_extra_inputs,
)
from difftune.methods.full.method import generate_text_to_image
from difftune.methods.lora.method import Lora

if TYPE_CHECKING:
    from difftune.methods.distill.spec import DistillMethod

SIGMA_DATA = 0.5
"""The consistency boundary condition's data scale (diffusers' scripts and LCMScheduler: 0.5)."""


def boundary_scalings(timesteps: torch.Tensor, timestep_scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at discrete timesteps (LCM paper eq. 7 with the scripts' scaled time):
    c_skip = sd^2 / ((s t)^2 + sd^2), c_out = s t / sqrt((s t)^2 + sd^2). Both are 1 and 0
    at t = 0, so the model is the identity there."""
    scaled = timestep_scaling * timesteps.float()
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (batch,) tensor shaped to broadcast over `like`."""
    return values.view(-1, *[1] * (like.dim() - 1))


@dataclass(frozen=True)
class DdimSolver:
    """The DDIM grid the teacher steps along: k = T // steps, timesteps k - 1, 2k - 1, ...,
    steps * k - 1 (the scripts' DDIMSolver), and the training schedule's alphas_cumprod."""

    alphas_cumprod: torch.Tensor
    timesteps: torch.Tensor
    skip: int

    @classmethod
    def of(cls, scheduler: Any, steps: int) -> DdimSolver:
        train_steps = scheduler.config.num_train_timesteps
        if steps > train_steps:
            raise ValueError(f"method.distill.num_ddim_timesteps = {steps}: the base trains over {train_steps} "
                             "timesteps, fewer than the solver's steps")
        skip = train_steps // steps
        grid = torch.arange(1, steps + 1, dtype=torch.long) * skip - 1
        return cls(scheduler.alphas_cumprod.detach().float().cpu(), grid, skip)

    def span(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+k}, t_n) for grid indices: the solver's step starts at the grid point and
        ends k earlier (at 0 from the first point)."""
        start = self.timesteps.to(index.device)[index]
        return start, (start - self.skip).clamp_min(0)

    def alpha_sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]), shaped like `like`."""
        alphas = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return per_sample(alphas.sqrt(), like), per_sample((1 - alphas).sqrt(), like)

    def x0_and_noise(self, output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean sample and the noise a denoiser's output implies at `timesteps`
        (epsilon: x0 = (z - sigma eps) / alpha; v: x0 = alpha z - sigma v, eps = alpha v + sigma z)."""
        alpha, sigma = self.alpha_sigma(timesteps, sample)
        output = output.float()
        if prediction_type == "epsilon":
            return (sample - sigma * output) / alpha, output
        if prediction_type == "v_prediction":
            return alpha * sample - sigma * output, alpha * output + sigma * sample
        raise ValueError(f"consistency distillation takes epsilon or v_prediction, not {prediction_type!r}")

    def ddim_step(self, x0: torch.Tensor, noise: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """One deterministic DDIM step to t_n (eta 0): sqrt(a_n) x0 + sqrt(1 - a_n) eps."""
        alpha, sigma = self.alpha_sigma(end, x0)
        return alpha * x0 + sigma * noise


def samples_of(text: dict[str, torch.Tensor], geometry: torch.Tensor | None,
               keep: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The text conditioning and geometry of the samples `keep` (a boolean mask or indices) selects."""
    return {name: value[keep] for name, value in text.items()}, None if geometry is None else geometry[keep]


@dataclass(frozen=True)
class Draws:
    """What one step draws per sample: the solver's grid index, the noise, the guidance w."""

    index: torch.Tensor
    noise: torch.Tensor
    guidance: torch.Tensor


@contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """The module without its peft adapters (the base it was distilled from), restored
    after: each adapter layer switched as diffusers' disable_adapters / enable_adapters do
    (through a DDP wrapper too; peft leaves the adapters trainable again on the way back)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [layer for layer in module.modules() if isinstance(layer, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def consistency_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float) -> torch.Tensor:
    """Pseudo-Huber (mean of sqrt(d^2 + c^2) - c) or squared error (mean of d^2), in fp32."""
    difference = prediction.float() - target.float()
    if kind == "huber":
        return (torch.sqrt(difference**2 + huber_c**2) - huber_c).mean()
    return (difference**2).mean()


class LcmDistill(FromSettings):
    """kind = "distill", distill.kind = "lcm": a LoRA on the denoiser learns the consistency
    function of the guided teacher (the base)."""

    floor_settings = None
    card_tags = ["lora", "lcm", "lcm-lora"]

    def __init__(self, config: DistillMethod) -> None:
        super().__init__(config)
        self.settings = config.distill
        self.adapters = Lora(config)  # the LoRA method's adapters, checkpoints and file
        self.solver: DdimSolver | None = None
        self.empty_prompt: dict[str, torch.Tensor] | None = None

    def build(self, family: Family, parts: Parts) -> Trained:
        self.solver = DdimSolver.of(parts.noise_scheduler, self.settings.num_ddim_timesteps)
        return self.adapters.build(family, parts)

    def training_data(self, family: Family, parts: Parts, trained: Trained, samples: Dataset,
                      accelerator: Any) -> Dataset:
        """The rows as they are; the empty prompt is encoded now, while the text encoders are
        loaded (a text cache takes them off the accelerator next)."""
        self.uncond(family, parts)
        return samples

    condition = staticmethod(no_extra_inputs)

    reduce = staticmethod(mean_loss)

    def uncond(self, family: Family, parts: Parts) -> dict[str, torch.Tensor]:
        """The family's encoding of "" (its pipelines' unconditional half), once."""
        if self.empty_prompt is None:
            with torch.no_grad():
                self.empty_prompt = {name: value.detach() for name, value in family.encode_prompts(parts, [""]).items()}
        return self.empty_prompt

    def draw(self, clean: CleanInputs) -> Draws:
        """Per sample from its own generator, in this order: grid index, noise, guidance."""
        latents, settings = clean.latents, self.settings
        shape, device = latents.shape[1:], latents.device
        index, noise, guidance = [], [], []
        for generator in clean.generators:
            index.append(torch.randint(0, settings.num_ddim_timesteps, (1,), generator=generator, device=device))
            noise.append(torch.randn(shape, generator=generator, device=device))
            guidance.append(torch.rand((1,), generator=generator, device=device))
        w = settings.w_min + (settings.w_max - settings.w_min) * torch.cat(guidance)
        return Draws(torch.cat(index), torch.stack(noise), w)

    def loss(self, family: Family, parts: Parts, trained: Trained, batch: dict[str, Any],
             clean: CleanInputs) -> torch.Tensor:
        draws = self.draw(clean)  # the grid index too with trajectory targets: the same draws either way
        if self.settings.target == "trajectory":
            return self.trajectory_loss(family, parts, clean, draws)
        return self.distill_loss(family, parts, clean, draws)

    def consistency(self, output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
        """The consistency function's value: c_skip z + c_out x0 of the denoiser's output."""
        assert self.solver is not None
        x0, _ = self.solver.x0_and_noise(output, timesteps, sample, prediction_type)
        c_skip, c_out = boundary_scalings(timesteps, self.settings.timestep_scaling)
        return per_sample(c_skip, sample) * sample + per_sample(c_out, sample) * x0

    def trajectory_loss(self, family: Family, parts: Parts, clean: CleanInputs, draws: Draws) -> torch.Tensor:
        """target = "trajectory": each group of num_ddim_timesteps samples takes the points
        of one guided teacher chain down the grid (its first sample's noise, caption, guidance
        and geometry), the chain's end the target of all of them."""
        assert self.solver is not None
        solver, settings = self.solver, self.settings
        prediction_type = parts.noise_scheduler.config.prediction_type
        batch, points = clean.latents.shape[0], settings.num_ddim_timesteps
        position = torch.arange(batch, device=clean.latents.device)
        leaders = position[::points]
        group, depth = position // points, position % points  # depth 0: the grid's top
        text, geometry = samples_of(clean.text, clean.geometry, leaders)
        top = solver.timesteps[-1:].to(position.device).expand(len(leaders))
        sample = draws.noise[leaders]
        if not settings.start_from_noise:
            alpha, sigma = solver.alpha_sigma(top, sample)
            sample = alpha * clean.latents[leaders].float() + sigma * sample
        chain, times, here = [], [], top
        with torch.no_grad():
            for _ in range(points):  # the grid's top to 0 (a shorter batch uses the upper points)
                chain.append(sample)
                times.append(here)
                there = (here - solver.skip).clamp_min(0)
                sample = self.teacher_step(family, parts, ModelInputs(sample, here, text, geometry),
                                           draws.guidance[leaders], there, prediction_type)
                here = there
        noisy = torch.stack(chain)[depth, group]
        timesteps = torch.stack(times)[depth, group]
        student_text, student_geometry = samples_of(text, geometry, group)
        inputs = ModelInputs(noisy, timesteps, student_text, student_geometry)
        prediction = self.consistency(family.predict(parts, inputs), timesteps, noisy, prediction_type)
        return consistency_loss(prediction, sample[group], settings.loss, settings.huber_c)

    def distill_loss(self, family: Family, parts: Parts, clean: CleanInputs, draws: Draws) -> torch.Tensor:
        """The consistency distillation loss for these draws (the module docstring's steps 2-6)."""
        assert self.solver is not None, "build() makes the solver"
        solver, settings = self.solver, self.settings
        prediction_type = parts.noise_scheduler.config.prediction_type
        latents = clean.latents.float()
        start, end = solver.span(draws.index)
        alpha, sigma = solver.alpha_sigma(start, latents)
        noisy = alpha * latents + sigma * draws.noise
        if settings.start_from_noise:  # the top of the grid from noise alone, as sampling starts
            noisy = torch.where(per_sample(start == int(solver.timesteps[-1]), noisy), draws.noise, noisy)
        inputs = ModelInputs(noisy, start, clean.text, clean.geometry)
        prediction = self.consistency(family.predict(parts, inputs), start, noisy, prediction_type)
        with torch.no_grad():
            x_prev = self.teacher_step(family, parts, inputs, draws.guidance, end, prediction_type)
            # At t_n = 0 the boundary condition is the identity (c_skip 1, c_out 0): the target
            # is x_prev itself, so only the other samples pass through the target.
            target, later = x_prev.clone(), end > 0
            if bool(later.any()):
                target_inputs = ModelInputs(x_prev[later], end[later], *samples_of(clean.text, clean.geometry, later))
                target[later] = self.consistency(family.predict(parts, target_inputs), end[later], x_prev[later],
                                                 prediction_type)
        return consistency_loss(prediction, target, settings.loss, settings.huber_c)

    def teacher_step(self, family: Family, parts: Parts, inputs: ModelInputs, guidance: torch.Tensor,
                     end: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """The guided teacher's solution from t_{n+k} to t_n: teacher_substeps DDIM steps
        at evenly spaced timesteps (one, the scripts' jump, by default)."""
        substeps, start = self.settings.teacher_substeps, inputs.timesteps
        sample = inputs.noisy
        for j in range(1, substeps + 1):
            here = start - torch.div((start - end) * (j - 1), substeps, rounding_mode="floor")
            there = start - torch.div((start - end) * j, substeps, rounding_mode="floor")
            sample = self.guided_ddim_step(family, parts, replace(inputs, noisy=sample, timesteps=here), guidance,
                                           there, prediction_type)
        return sample

    def guided_ddim_step(self, family: Family, parts: Parts, inputs: ModelInputs, guidance: torch.Tensor,
                         end: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """One guided DDIM step of the teacher to `end`: x0 and eps mixed as
        cond + w (cond - uncond), each from the base without its adapters."""
        assert self.solver is not None
        solver, batch = self.solver, inputs.noisy.shape[0]
        device = inputs.noisy.device
        empty = {name: value.to(device).expand(batch, *value.shape[1:])
                 for name, value in self.uncond(family, parts).items()}
        with adapters_off(parts.denoiser):
            cond = family.predict(parts, inputs)
            uncond = family.predict(parts, replace(inputs, text=empty))
        cond_x0, cond_eps = solver.x0_and_noise(cond, inputs.timesteps, inputs.noisy, prediction_type)
        uncond_x0, uncond_eps = solver.x0_and_noise(uncond, inputs.timesteps, inputs.noisy, prediction_type)
        w = per_sample(guidance, inputs.noisy)
        x0 = cond_x0 + w * (cond_x0 - uncond_x0)
        eps = cond_eps + w * (cond_eps - uncond_eps)
        return solver.ddim_step(x0, eps, end)

    def store(self, name: str, module: nn.Module, folder: Path) -> None:
        self.adapters.store(name, module, folder)

    def restore(self, name: str, module: nn.Module, folder: Path) -> None:
        self.adapters.restore(name, module, folder)

    def save(self, family: Family, parts: Parts, trained: Trained, out_dir: Path) -> None:
        self.adapters.save(family, parts, trained, out_dir)

    def usage(self, family: Family, repo: str, base: str) -> str:
        loading = family_usage(self, family, repo, base)
        return ("from diffusers import LCMScheduler\n" + loading +
                "\npipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
                'image = pipe("a photo of a cat", num_inference_steps=4, guidance_scale=1.0).images[0]')

    generate = staticmethod(generate_text_to_image)
