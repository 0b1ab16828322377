"""Distillation as the catalog lists it: [method.distill] (which distillation, and its
settings) and the adapters it trains ([method.lora], required)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, model_validator

from difftune.catalog import MethodSpec
from difftune.method_settings import MethodSettings
from difftune.methods.lora.spec import AdaptersOut, LoraSettings
from difftune.strict import Section

if TYPE_CHECKING:
    from difftune.sampling import BaseSampling

LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
"""The UNet modules diffusers' LCM-LoRA scripts adapt when --lora_target_modules is not
given (every attention, feed-forward, resnet and resampling layer); the presets list them
as method.lora.target_modules."""


class DistillSettings(Section):
    """Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"; LCM-LoRA,
    Luo et al. 2023) of the base into adapters, as diffusers'
    examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py and
    train_lcm_distill_lora_sdxl.py train it: the base with its adapters off is the teacher
    (classifier-free guided, one DDIM step), the base with them on the student, and the
    student itself (no gradient, no EMA copy) gives the target (or, with target =
    "trajectory", the end of the teacher's chain down the grid). The result samples in 4 to
    8 steps with LCMScheduler at guidance 1."""

    kind: Literal["lcm"]
    """Which distillation: "lcm" (latent consistency distillation into a LoRA, LCM-LoRA)."""
    num_ddim_timesteps: int = Field(50, ge=1, le=1000)
    """Steps of the DDIM solver the teacher takes along the probability-flow ODE: it skips
    k = num_train_timesteps // num_ddim_timesteps training timesteps at a time (the scripts'
    --num_ddim_timesteps, 50: k = 20 over SD's 1000)."""
    teacher_substeps: int = Field(1, ge=1, le=100)
    """Guided DDIM steps the teacher takes within one solver step (from t_{n+k} to t_n,
    evenly spaced): 1 is the scripts' single DDIM jump of k. More make the teacher's ODE
    solution nearer its many-step one (its target, what the student learns to reach, is
    then that of a finer sampler) on a coarse grid, at two more denoiser passes each."""
    w_min: float = Field(5.0, ge=0.0)
    """Lowest guidance w the teacher is sampled with, drawn per sample uniformly in
    [w_min, w_max]. As the scripts compute it: cond + w (cond - uncond), so w is a
    classifier-free guidance scale of w + 1. 5.0 is the SD script's default; its SDXL script
    uses 3.0 (configs/sdxl/distill_lcm.toml)."""
    w_max: float = Field(15.0, ge=0.0)
    """Highest guidance w (both scripts: 15.0)."""
    loss: Literal["huber", "l2"] = "huber"
    """"huber": mean of sqrt((pred - target)^2 + c^2) - c (pseudo-Huber, as the scripts'
    --loss_type huber, which their READMEs train LCM-LoRAs with); "l2": mean squared error
    (the scripts' argparse default)."""
    huber_c: float = Field(0.001, gt=0.0)
    """The pseudo-Huber loss's c (the scripts' --huber_c); loss "huber" only."""
    timestep_scaling: float = Field(10.0, gt=0.0)
    """The consistency boundary condition's time scale (the scripts'
    --timestep_scaling_factor and LCMScheduler's timestep_scaling, 10): c_skip =
    0.25 / ((s t)^2 + 0.25), c_out = s t / sqrt((s t)^2 + 0.25), sigma_data 0.5."""

    start_from_noise: bool = False
    """At the solver's highest timestep (where few-step sampling starts), the student and
    the teacher read pure noise, as LCMScheduler's first step does, instead of a training
    latent noised there. A scaled-linear schedule keeps a trace of the image at its last
    timestep (SD's terminal SNR is 0.005, not 0: Lin et al. 2024), which in training always
    agrees with the caption; a student may learn to read colours and layout from it, and
    at sampling, from noise that has none, follow whatever the noise suggests. False is the
    scripts' way (every timestep from noised data)."""

    target: Literal["consistency", "trajectory"] = "consistency"
    """What the student at a solver timestep learns to reach. "consistency" (the scripts'):
    the student itself (no gradient) at the next lower timestep, after one teacher jump
    there, so the solution travels down the grid as the student learns it.
    "trajectory": the end of the teacher's whole guided DDIM chain down the grid. The
    samples go in groups of num_ddim_timesteps; each group's first sample starts a chain at
    the grid's top (its noise, its caption and guidance) and every sample of the group
    takes one point of that chain, all with the chain's end as their target: the exact
    target at every timestep from the first step, at the teacher passes of one chain per
    group (no target pass)."""

    @model_validator(mode="after")
    def _guidance_range(self) -> DistillSettings:
        if self.w_min > self.w_max:
            raise ValueError(f"w_min ({self.w_min:g}) is above w_max ({self.w_max:g}): the teacher's guidance is "
                             "drawn from [w_min, w_max]")
        return self


class DistillMethod(AdaptersOut, MethodSettings):
    """kind = "distill": a step-distilled LoRA of the base (LCM-LoRA); only the adapters
    train, and final/ is the LoRA file diffusers' load_lora_weights reads, sampled with
    LCMScheduler in 4 steps at guidance 1."""

    own_loss: ClassVar[str | None] = ("the consistency loss of [method.distill] (loss, huber_c), with the "
                                       "teacher predicting as the base's scheduler says")
    kind: Literal["distill"] = "distill"
    distill: DistillSettings
    """Which distillation ("lcm") and its settings."""
    lora: LoraSettings
    """The adapters that learn the distilled model (required: the base stays the teacher).
    diffusers' scripts train rank 64, alpha 64 on every attention, feed-forward, resnet and
    resampling layer of the UNet (the presets list them in target_modules); left out,
    target_modules takes the family's attention projections."""

    def batch_notes(self, batch_size: int) -> list[str]:
        """Trajectory targets walk one chain of num_ddim_timesteps guided jumps per group of
        that many samples: a smaller batch pays for the whole chain and uses its top."""
        points = self.distill.num_ddim_timesteps
        if self.distill.target != "trajectory" or batch_size >= points:
            return []
        return [f"method.distill.target = \"trajectory\" walks a chain of {points} guided teacher jumps for "
                f"each group of {points} samples, and a batch holds {batch_size}: every step pays for the whole "
                f"chain and trains on its top {batch_size} point(s) (a batch of at least {points} or a coarser "
                "method.distill.num_ddim_timesteps uses all of it)"]

    @property
    def sampling(self) -> BaseSampling | None:
        """An LCM-LoRA samples as an LCM does: LCMScheduler, 4 steps, guidance 1."""
        from difftune.sampling import sampling_of

        return sampling_of({"_class_name": "LCMScheduler"})


SPEC = MethodSpec(kind="distill", description="step distillation into a LoRA (lcm: LCM-LoRA)",
                  settings=DistillMethod, needs=frozenset({"lora", "consistency_distillation"}),
                  factory="difftune.methods.distill.method:LcmDistill")
