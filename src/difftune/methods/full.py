"""Full fine-tuning: every weight of the denoiser (and optionally the text encoder)
trains; the result is a whole pipeline.

On a random-weight base this is training from scratch (how the demo base is made).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from difftune.config import MethodConfig
from difftune.families.base import Family, Parts, inference_copy
from difftune.methods.base import (
    Trained,
    freeze,
    mean_loss,
    no_extra_inputs,
    restore_pretrained,
    same_samples,
    store_pretrained,
    trainable_fp32,
)


def with_trained(parts: Parts, trained: Trained) -> Parts:
    """The parts with the trained UNet and text encoder (when trained) swapped in."""
    return replace(
        parts,
        denoiser=trained.get("unet", parts.denoiser),
        text_encoder=trained.get("text_encoder", parts.text_encoder),
    )


def generate_text_to_image(
    family: Family,
    parts: Parts,
    trained: Trained,
    prompt: str | list[str],
    image: Image.Image | list[Image.Image] | None,
    settings: dict[str, Any],
    generator: torch.Generator,
) -> list[Image.Image]:
    """Method.generate for methods that change weights: the plain pipeline over the
    parts, trained modules in the frozen parts' dtype (`image` is not used)."""
    dtype = next(parts.vae.parameters()).dtype
    copies = {name: inference_copy(module, dtype) for name, module in trained.items()}
    pipeline = family.text_to_image_pipeline(with_trained(parts, copies))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(prompt, generator=generator, **settings).images


class FullFineTune:
    name = "full"
    needs_conditioning = False
    fixed_caption = None
    floor_settings = None
    card_tags = ["full-fine-tune"]

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def build(self, family: Family, parts: Parts) -> Trained:
        freeze(parts)
        trained = {"unet": trainable_fp32(parts.denoiser)}
        if self.config.train_text_encoder:
            trained["text_encoder"] = trainable_fp32(parts.text_encoder)
        return trained

    training_data = staticmethod(same_samples)

    def training_parts(self, parts: Parts, trained: Trained) -> Parts:
        # The step must call the accelerate-prepared (possibly DDP-wrapped) modules so
        # gradients are synchronised across processes.
        return with_trained(parts, trained)

    condition = staticmethod(no_extra_inputs)

    reduce = staticmethod(mean_loss)

    store = staticmethod(store_pretrained)
    restore = staticmethod(restore_pretrained)

    def save(self, family: Family, parts: Parts, trained: Trained, out_dir: Path) -> None:
        # Frozen parts may sit in bf16/fp16 for training; the saved pipeline is fp32 throughout.
        full_precision = replace(
            with_trained(parts, trained),
            vae=_fp32(parts.vae),
            text_encoder=_fp32(trained.get("text_encoder", parts.text_encoder)),
        )
        family.text_to_image_pipeline(full_precision).save_pretrained(out_dir, safe_serialization=True)

    def usage(self, repo: str, base: str) -> str:
        return f'from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained("{repo}")'

    generate = staticmethod(generate_text_to_image)


def _fp32(module: nn.Module) -> nn.Module:
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(torch.float32)
