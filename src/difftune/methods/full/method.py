"""Full fine-tuning: every weight of the denoiser (and optionally the text encoder)
trains; the result is a whole pipeline.

On a random-weight base this is training from scratch (how the demo base is made).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from difftune.families.base import Family, Parts, dtype_of, inference_copy
from difftune.methods.base import (
    FromSettings,
    Trained,
    denoiser_and_text_encoders,
    family_usage,
    freeze,
    mean_loss,
    no_extra_inputs,
    restore_pretrained,
    same_samples,
    store_pretrained,
    trainable_fp32,
)


def generate_with_trained(
    family: Family,
    parts: Parts,
    trained: Trained,
    prompt: str | list[str],
    settings: dict[str, Any],
    generator: torch.Generator,
    kind: str | None = None,
    call: dict[str, Any] | None = None,
) -> list[Image.Image]:
    """The family's pipeline of `kind` over the parts, the trained modules swapped in at
    the frozen parts' dtype; `call` adds arguments (a control image)."""
    dtype = dtype_of(parts.vae)
    copies = {name: inference_copy(module, dtype) for name, module in trained.items()}
    pipeline = family.pipeline(parts.with_modules(copies), kind)
    pipeline.set_progress_bar_config(disable=True)
    settings = dict(settings)
    if "guidance_scale" in settings:  # as the family's pipelines take it
        count = 1 if isinstance(prompt, str) else len(prompt)
        settings |= family.guidance_arguments(pipeline, settings.pop("guidance_scale"), count)
    # by name: the edit pipelines take `image` first
    return pipeline(prompt=prompt, **(call or {}), generator=generator, **family.generation_options(pipeline),
                    **settings).images


def generate_text_to_image(
    family: Family,
    parts: Parts,
    trained: Trained,
    prompt: str | list[str],
    image: Image.Image | list[Image.Image] | None,
    settings: dict[str, Any],
    generator: torch.Generator,
) -> list[Image.Image]:
    """Method.generate for methods that change weights: text-to-image (`image` is not used)."""
    return generate_with_trained(family, parts, trained, prompt, settings, generator)


def generate_conditioned(kind: str) -> Any:
    """Method.generate for a method whose pipeline of `kind` ("controlnet", "control")
    takes the conditioning image, as the family's pipelines name it."""

    def generate(self: Any, family: Family, parts: Parts, trained: Trained, prompt: str | list[str],
                 image: Image.Image | list[Image.Image] | None, settings: dict[str, Any],
                 generator: torch.Generator) -> list[Image.Image]:
        return generate_with_trained(family, parts, trained, prompt, settings, generator, kind,
                                     family.control_arguments(image))

    return generate


class FullFineTune(FromSettings):
    floor_settings = None
    card_tags = ["full-fine-tune"]

    def build(self, family: Family, parts: Parts) -> Trained:
        freeze(parts)
        chosen = denoiser_and_text_encoders(parts, self.config.trains_text_encoder)
        return {name: trainable_fp32(module) for name, module in chosen.items()}

    training_data = staticmethod(same_samples)

    condition = staticmethod(no_extra_inputs)

    reduce = staticmethod(mean_loss)

    store = staticmethod(store_pretrained)
    restore = staticmethod(restore_pretrained)

    def save(self, family: Family, parts: Parts, trained: Trained, out_dir: Path) -> None:
        save_pipeline(family, parts, trained, out_dir)

    usage = family_usage

    generate = staticmethod(generate_text_to_image)


def save_pipeline(family: Family, parts: Parts, trained: Trained, out_dir: Path, kind: str | None = None) -> None:
    """The family's pipeline (of `kind`) over the parts with the trained modules, in fp32
    throughout: frozen parts may sit in bf16/fp16 for training."""
    full_precision = parts.with_modules({name: _fp32(module) for name, module in
                                         parts.with_modules(trained).modules().items()})
    family.pipeline(full_precision, kind).save_pretrained(out_dir, safe_serialization=True)


def _fp32(module: nn.Module) -> nn.Module:
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(torch.float32)
