"""Full fine-tuning: every weight of the denoiser trains; the result is a whole pipeline.

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
from difftune.families.base import Family, ModelInputs, Parts, inference_copy


class FullFineTune:
    name = "full"
    needs_conditioning = False
    weights_subfolder = "unet"
    floor_settings = None
    card_tags = ["full-fine-tune"]

    def build(self, family: Family, parts: Parts, config: MethodConfig) -> nn.Module:
        for module in parts.modules():
            module.requires_grad_(False)
        denoiser = parts.denoiser
        if any(p.dtype != torch.float32 for p in denoiser.parameters()):
            denoiser.to(torch.float32)  # trainable weights stay fp32 under mixed precision
        denoiser.requires_grad_(True).train()
        return denoiser

    def training_parts(self, parts: Parts, model: nn.Module) -> Parts:
        # The step must call the accelerate-prepared (possibly DDP-wrapped) denoiser so
        # gradients are synchronised across processes.
        return replace(parts, denoiser=model)

    def condition(
        self, family: Family, parts: Parts, model: nn.Module, batch: dict[str, Any], inputs: ModelInputs
    ) -> ModelInputs:
        return inputs

    def reduce(self, per_sample_loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return per_sample_loss.mean()

    def save(self, family: Family, parts: Parts, model: nn.Module, out_dir: Path) -> None:
        # Frozen parts may sit in bf16/fp16 for training; the saved pipeline is fp32 throughout.
        full_precision = replace(parts, denoiser=model, vae=_fp32(parts.vae), text_encoder=_fp32(parts.text_encoder))
        pipeline = family.text_to_image_pipeline(full_precision)
        pipeline.save_pretrained(out_dir, safe_serialization=True)

    def usage(self, repo: str, base: str) -> str:
        return f'from diffusers import StableDiffusionPipeline\npipe = StableDiffusionPipeline.from_pretrained("{repo}")'

    def generate(
        self,
        family: Family,
        parts: Parts,
        model: nn.Module,
        prompt: str | list[str],
        image: Image.Image | list[Image.Image] | None,
        settings: dict[str, Any],
        generator: torch.Generator,
    ) -> list[Image.Image]:
        frozen_dtype = next(parts.vae.parameters()).dtype
        pipeline = family.text_to_image_pipeline(replace(parts, denoiser=inference_copy(model, frozen_dtype)))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(prompt, generator=generator, **settings).images


def _fp32(module: nn.Module) -> nn.Module:
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(torch.float32)
