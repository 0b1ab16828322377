"""The sections about what a run shows and publishes besides its weights: validation
(images, and the control metric against its floor) and the Hub upload. Typed and strict,
as every section (sections.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from difftune.config.sections import PathText, _Section


class ValidationConfig(_Section):
    every: int = Field(100, gt=0)
    """Validate every N optimizer steps (and once at the end)."""
    prompts: list[str] = []
    """Prompts generated at each validation (num_images each). A method that takes a
    conditioning image (controlnet, control, edit) needs images with them; the others take
    prompts alone. Empty: no images are generated (a metric, if set, still runs)."""
    images: list[PathText | list[PathText]] = []
    """Conditioning image files; one for all prompts, one per prompt, or N with N prompts. For
    an edit, an entry may be a list: that prompt's several reference images (Qwen-Image-Edit
    Plus)."""
    num_images: int = Field(4, gt=0, le=64)
    """Images generated per (prompt, conditioning image) pair."""
    steps: int | None = Field(None, gt=0, le=1000)
    """Inference steps. Unset: the base's own for a step-distilled base (Turbo 1, LCM 4:
    sampling.py), else 20. Also `difftune generate`'s default for the run."""
    guidance_scale: float | None = Field(None, ge=0, le=100)
    """Guidance scale of the validation images: classifier-free, or a guidance-distilled
    transformer's guidance input (Qwen-Image without one: true_cfg_scale with an empty
    negative prompt). Unset: the base's own for a step-distilled base (Turbo 0, LCM 1), else
    7.5. Also `difftune generate`'s default for the run."""
    scheduler: str | None = None
    """The diffusers scheduler class validation samples with, made from the base's scheduler
    config ("EulerAncestralDiscreteScheduler", "LCMScheduler", "UniPCMultistepScheduler").
    Unset: the base's own for a step-distilled base (its scheduler config names it), else the
    family's sampler (UniPC for SD and SDXL, the flow-matching Euler for the transformers).
    Also what `difftune generate` samples the run's result with."""
    seed: int | None = Field(None, ge=0, lt=2**63)
    """Generator seed; defaults to train.seed."""
    metric: Literal["none", "fill_circles", "canny", "fill_circles_edit"] = "none"
    """Control-fidelity metric computed at each validation (and for the uncontrolled floor)."""
    metric_data: PathText | None = None
    """Held-out dataset (same columns as [data]) whose conditionings and captions are scored."""
    metric_samples: int = Field(32, gt=0, le=100_000)
    """How many held-out rows the metric scores."""

    @field_validator("scheduler")
    @classmethod
    def _a_scheduler_class(cls, name: str | None) -> str | None:
        if name is None:
            return None
        from difftune.sampling import is_scheduler_class  # (imports diffusers: only when one is named)

        if not is_scheduler_class(name):
            raise ValueError(f"{name!r} is not a diffusers scheduler class (such as \"EulerAncestralDiscreteScheduler\", "
                             "\"LCMScheduler\", \"UniPCMultistepScheduler\")")
        return name

    @model_validator(mode="after")
    def _metric_needs_data(self) -> ValidationConfig:
        if self.metric != "none" and not self.metric_data:
            raise ValueError(f"metric = {self.metric!r} needs metric_data (a held-out dataset)")
        return self

    @model_validator(mode="after")
    def _prompts_match_images(self) -> ValidationConfig:
        n_prompts, n_images = len(self.prompts), len(self.images)
        if n_images == 0:
            return self
        if n_prompts == 0:
            raise ValueError("images need prompts")
        if n_prompts != n_images and 1 not in (n_prompts, n_images):
            raise ValueError(
                f"{n_prompts} prompts and {n_images} images: give one of them once, "
                "or the same number of each"
            )
        return self

    def listed_images(self) -> list[tuple[str, str]]:
        """("validation.images[i]", or "[i][j]" in an edit's list of references; path) for
        every image listed, in order: what messages name."""
        listed = []
        for index, entry in enumerate(self.images):
            if isinstance(entry, list):
                listed += [(f"validation.images[{index}][{number}]", path) for number, path in enumerate(entry)]
            else:
                listed.append((f"validation.images[{index}]", entry))
        return listed

    def pairs(self) -> list[tuple[str, str | list[str] | None]]:
        """(prompt, conditioning image path(s) or None) pairs, broadcasting a single one."""
        if not self.images:
            return [(prompt, None) for prompt in self.prompts]
        count = max(len(self.prompts), len(self.images))
        prompts = self.prompts * count if len(self.prompts) == 1 else self.prompts
        images = self.images * count if len(self.images) == 1 else self.images
        return list(zip(prompts, images))


class HubConfig(_Section):
    push: bool = False
    """After training, write the model card (settings, latest validation grids) into
    final/ and upload final/. Checked before training: the Hub must be reachable and a
    token set."""
    model_id: str | None = None
    """Repository id; defaults to the output_dir's name."""
    private: bool = False
    """Create the repository as private (an existing one keeps its visibility)."""
