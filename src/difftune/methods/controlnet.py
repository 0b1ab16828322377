"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet encoder whose
zero-initialised outputs are added to the frozen UNet's skip connections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from difftune.config import MethodConfig
from difftune.families.base import Family, ModelInputs, Parts, inference_copy


class ControlNet:
    name = "controlnet"
    needs_conditioning = True
    weights_subfolder = "controlnet"
    floor_settings = {"controlnet_conditioning_scale": 0.0}
    card_tags = ["controlnet"]
    """Generation settings that switch the method off: the base alone, for the metric floor."""

    def build(self, family: Family, parts: Parts, config: MethodConfig) -> nn.Module:
        for module in parts.modules():
            module.requires_grad_(False)
        controlnet = family.make_controlnet(parts, config.controlnet, conditioning_channels=3)
        # Trainable weights stay fp32; mixed precision comes from autocast, as in diffusers.
        if any(p.dtype != torch.float32 for p in controlnet.parameters()):
            controlnet.to(torch.float32)
        controlnet.requires_grad_(True).train()
        return controlnet

    def training_parts(self, parts: Parts, model: nn.Module) -> Parts:
        return parts

    def condition(
        self, family: Family, parts: Parts, model: nn.Module, batch: dict[str, Any], inputs: ModelInputs
    ) -> ModelInputs:
        conditioning = batch["conditioning_pixels"].to(inputs.noisy.device)
        return inputs.with_extra(**family.controlnet_residuals(model, inputs, conditioning))

    def reduce(self, per_sample_loss: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return per_sample_loss.mean()

    def save(self, family: Family, parts: Parts, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    def usage(self, repo: str, base: str) -> str:
        return (
            "from diffusers import ControlNetModel, StableDiffusionControlNetPipeline\n"
            f'controlnet = ControlNetModel.from_pretrained("{repo}")\n'
            f'pipe = StableDiffusionControlNetPipeline.from_pretrained("{base}", controlnet=controlnet)'
        )

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
        controlnet = inference_copy(model, next(parts.denoiser.parameters()).dtype)
        pipeline = family.controlnet_pipeline(parts, controlnet)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(prompt, image=image, generator=generator, **settings).images
