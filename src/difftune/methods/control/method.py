"""Channel-concat Control (FLUX.1 Canny/Depth; diffusers' examples/flux-control and
cogview4-control): the control image's latents are concatenated to the noisy latents
on the channel axis, and the denoiser's input projection (`family.input_projection`)
is widened to take them: the old weights first, zeros for the new inputs, so before the
first step the model computes exactly what the base does.

Full: the whole denoiser trains; final/ is the family's control pipeline
(FluxControlPipeline, CogView4ControlPipeline). With [method.lora] (Control-LoRA):
adapters train on the family's targets plus the widened projection, whose base weights
keep their zeros; final/ is a LoRA file that the control pipeline's load_lora_weights
reads (diffusers widens the base projection with zeros again when it loads it). Where
the control pipeline has no LoRA loader (CogView4), final/<denoiser>/ also holds the
transformer with the adapters fused in, fused onto the base read again in full precision
(`fused_copy`: a quantized or bf16 base cannot take them exactly).

The control image is encoded with the VAE's posterior mean, shifted and scaled like
the latents (kept in the latent cache when data.cache_latents is on); the control
pipeline draws a posterior sample instead (the VAE's posterior is narrow, so the two
differ by little).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftune.families.base import Family, ModelInputs, Parts
from difftune.methods.base import (
    FromSettings,
    Trained,
    family_usage,
    freeze,
    mean_loss,
    same_samples,
    trainable_fp32,
)
from difftune.methods.control.spec import ControlMethod
from difftune.methods.full.method import generate_conditioned, save_pipeline
from difftune.methods.lora.method import AdaptersOrWeights, Lora, add_lora, lora_config


def widen_input(denoiser: nn.Module, path: str, config: dict[str, Any]) -> None:
    """Replace the Linear or Conv2d at `path` by one taking twice its inputs: the old
    weights for the first half, zeros for the second; then record `config`."""
    parent_path, _, name = path.rpartition(".")
    parent = denoiser.get_submodule(parent_path) if parent_path else denoiser
    old = getattr(parent, name)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features * 2, old.out_features, bias=old.bias is not None)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels * 2, old.out_channels, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    else:
        raise TypeError(f"{path} is a {type(old).__name__}; Control widens a Linear or a Conv2d")
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.weight.shape[1]] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.requires_grad_(old.weight.requires_grad)
    setattr(parent, name, new)
    denoiser.register_to_config(**config)


def fused_copy(family: Family, parts: Parts, adapted: nn.Module) -> nn.Module:
    """The adapters of `adapted` fused into the base's denoiser read again from its files,
    in fp32 on the CPU, widened as training widened it. Not a copy of the trained module:
    its frozen weights may be 4- or 8-bit (model.quantize), which nothing can be fused
    into, or bf16, which would round the adapters' small changes away; and a copy on the
    accelerator would need a second denoiser's memory there."""
    import diffusers
    from peft import set_peft_model_state_dict

    from difftune.methods.lora.method import adapter_state

    denoiser = getattr(diffusers, family.denoiser_class).from_pretrained(
        parts.source, subfolder=parts.denoiser_name, dtype=torch.float32, **parts.weight_options)
    widen_input(denoiser, family.input_projection, family.widened_config(denoiser.config))
    denoiser.add_adapter(copy.deepcopy(adapted.peft_config["default"]))
    set_peft_model_state_dict(denoiser, {name: tensor.cpu() for name, tensor in adapter_state(adapted).items()})
    denoiser.fuse_lora()
    denoiser.unload_lora()
    return denoiser


class Control(AdaptersOrWeights, FromSettings):
    floor_settings = None  # the control input cannot be switched off by a pipeline setting
    card_tags = ["control"]
    conditioning_latents = True
    """With data.cache_latents, the cache holds the control image's latents too."""

    def __init__(self, config: ControlMethod) -> None:
        super().__init__(config)
        self.lora = Lora(config) if config.lora is not None else None  # its adapter files and checkpoints

    def build(self, family: Family, parts: Parts) -> Trained:
        freeze(parts)
        denoiser = parts.denoiser
        widen_input(denoiser, family.input_projection, family.widened_config(denoiser.config))
        if self.lora is None:
            return {parts.denoiser_name: trainable_fp32(denoiser)}
        settings = self.config.lora
        targets = (*(settings.target_modules or family.lora_targets), family.input_projection)
        return {parts.denoiser_name: add_lora(denoiser, lora_config(settings, targets))}

    training_data = staticmethod(same_samples)

    def condition(
        self, family: Family, parts: Parts, trained: Trained, batch: dict[str, Any], inputs: ModelInputs
    ) -> ModelInputs:
        device = inputs.noisy.device
        with torch.no_grad():
            if "conditioning_latent_mean" in batch:  # from the latent cache (the VAE may be off the device)
                mean = batch["conditioning_latent_mean"].to(device)
                control = family.sample_latents(parts, mean, torch.zeros_like(mean), None)
            else:  # conditioning pixels are in [0, 1] (as a ControlNet takes them); the VAE takes [-1, 1]
                control = family.encode_images(parts, batch["conditioning_pixels"].to(device) * 2 - 1, None)
        control = control.to(device=device, dtype=inputs.noisy.dtype)  # (the VAE's device may differ)
        return replace(inputs, noisy=torch.cat([inputs.noisy, control], dim=1))

    reduce = staticmethod(mean_loss)

    def save(self, family: Family, parts: Parts, trained: Trained, out_dir: Path) -> None:
        if self.lora is None:
            save_pipeline(family, parts, trained, out_dir, "control")
            return
        family.save_lora(out_dir, trained)
        if not hasattr(family.pipeline_class("control"), "load_lora_weights"):
            # CogView4ControlPipeline reads no LoRA: the adapters fused into a plain
            # (widened) transformer as well, in final/<denoiser>/
            fused = fused_copy(family, parts, trained[parts.denoiser_name])
            fused.save_pretrained(out_dir / parts.denoiser_name, safe_serialization=True)

    usage = family_usage

    generate = generate_conditioned("control")
