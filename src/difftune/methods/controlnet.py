"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet encoder whose
zero-initialised outputs are added to the frozen UNet's skip connections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from difftune.config import MethodConfig
from difftune.families.base import Family, ModelInputs, Parts


class ControlNet:
    name = "controlnet"
    needs_conditioning = True
    weights_subfolder = "controlnet"

    def build(self, family: Family, parts: Parts, config: MethodConfig) -> nn.Module:
        for module in parts.frozen_modules():
            module.requires_grad_(False)
        controlnet = family.make_controlnet(parts, config.controlnet, config.conditioning_channels)
        # Trainable weights stay fp32; mixed precision comes from autocast, as in diffusers.
        if any(p.dtype != torch.float32 for p in controlnet.parameters()):
            controlnet.to(torch.float32)
        controlnet.train()
        controlnet.requires_grad_(True)
        return controlnet

    def condition(
        self, family: Family, parts: Parts, model: nn.Module, batch: dict[str, Any], inputs: ModelInputs
    ) -> ModelInputs:
        conditioning = batch["conditioning_pixels"].to(inputs.noisy.device)
        return inputs.with_extra(**family.controlnet_residuals(model, inputs, conditioning))

    def reduce(self, per_sample_loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return per_sample_loss.mean()

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def generate(
        self,
        family: Family,
        parts: Parts,
        model: nn.Module,
        prompt: str,
        image: Image.Image | None,
        settings: dict[str, Any],
        generator: torch.Generator,
    ) -> list[Image.Image]:
        pipeline = family.controlnet_pipeline(parts, _in_dtype(model, parts.denoiser.dtype))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(prompt, image=image, generator=generator, **settings).images


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model in the frozen parts' dtype, for inference.

    A fresh copy: the fp32 master weights are never rounded, and the copy does not carry
    accelerate's mixed-precision forward wrapper, which returns fp32 residuals that a
    half-precision UNet cannot take.
    """
    if next(model.parameters()).dtype == dtype:
        return model
    fresh = type(model).from_config(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh.to(next(model.parameters()).device, dtype=dtype).eval()
