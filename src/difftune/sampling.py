"""How a base is sampled: its scheduler, steps and guidance, read from the base itself.

A step-distilled base is sampled as it was distilled to be, not with the family's usual
sampler (UniPC for SD and SDXL) at 20 steps of classifier-free guidance, which is what a
LoRA trained on it would otherwise be validated with (and judged broken by):
- SDXL Turbo / SD Turbo (adversarial diffusion distillation) ship an
  EulerAncestralDiscreteScheduler with timestep_spacing "trailing" and sample in 1 to 4
  steps with guidance off (diffusers' SDXL Turbo docs: guidance_scale 0.0);
- LCM models (and LCM-LoRA bases) ship an LCMScheduler and sample in 4 to 8 steps at
  guidance 1 (no classifier-free pass).
Any other base keeps the family's sampler, 20 steps and guidance 7.5. Every value can be
set in [validation] (steps, guidance_scale, scheduler), which also sets `difftune
generate`'s defaults for the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STANDARD_STEPS = 20
STANDARD_GUIDANCE = 7.5


@dataclass(frozen=True)
class BaseSampling:
    kind: str
    """"turbo", "lcm", or "standard" (not step-distilled)."""
    scheduler: str | None
    """The scheduler class to sample with (the base's own, for a distilled base); None: the
    family's sampler."""
    steps: int
    guidance_scale: float

    @property
    def distilled(self) -> bool:
        return self.kind != "standard"

    def describe(self) -> str:
        if not self.distilled:
            return "not step-distilled"
        name = {"turbo": "Turbo (adversarial diffusion distillation)", "lcm": "latent consistency (LCM)"}[self.kind]
        return f"step-distilled, {name}"


STANDARD = BaseSampling("standard", None, STANDARD_STEPS, STANDARD_GUIDANCE)


def sampling_of(scheduler_config: dict[str, Any] | None) -> BaseSampling:
    """The sampling a base's scheduler config (scheduler/scheduler_config.json) implies."""
    config = scheduler_config or {}
    name = config.get("_class_name")
    if name == "LCMScheduler":
        return BaseSampling("lcm", name, 4, 1.0)
    if name == "EulerAncestralDiscreteScheduler" and config.get("timestep_spacing") == "trailing":
        return BaseSampling("turbo", name, 1, 0.0)
    return STANDARD


def read_base_sampling(base: str, revision: str | None = None) -> BaseSampling:
    """The base's sampling, from its scheduler config (a base whose config cannot be read
    here, such as a Hub id not yet downloaded while offline, samples as standard)."""
    from difftune.model_files import read_config

    return sampling_of(read_config(base, "scheduler/scheduler_config.json", revision))


def is_scheduler_class(name: str) -> bool:
    """Whether `name` is one of diffusers' scheduler classes."""
    import diffusers
    from diffusers import SchedulerMixin

    found = getattr(diffusers, name, None) if name.isidentifier() else None
    return isinstance(found, type) and issubclass(found, SchedulerMixin)


def scheduler_named(name: str, config: Any) -> Any:
    """A scheduler of class `name` made from a scheduler config (a base's, whatever its class):
    the keys its class takes (the others, another class's options, would each be warned about)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, name)
    taken = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config({key: value for key, value in dict(config).items() if key in taken})
