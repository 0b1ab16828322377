"""Edit training (FLUX.1 Kontext, Qwen-Image-Edit): the reference images' latents join the
denoiser's token sequence after the target's, with position ids of their own, exactly as
the family's edit pipeline builds them at inference (families/base.py EditCapability);
the family's predict returns the target's tokens only, so the loss is on them alone.

Batches carry the references as the conditioning images do for a ControlNet: one per
sample, stacked (`conditioning_pixels`, or their latents from the latent cache), or, when
rows differ in how many they have, per sample (`references`: a list of pixel tensors each,
empty for a row that trains as text-to-image). Families whose text encoder sees the image
(Qwen-Image-Edit) encode the instruction with its references here, unless the text cache
holds it (one entry per row and caption, data/cache.py).

Full: the whole denoiser trains; final/ is the family's edit pipeline. With [method.lora]:
adapters on the family's targets; final/ is the LoRA file the edit pipeline's
load_lora_weights reads (the same loader as the family's text-to-image pipeline).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

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
from difftune.methods.edit.spec import EditMethod
from difftune.methods.full.method import generate_with_trained, save_pipeline
from difftune.methods.lora.method import AdaptersOrWeights, Lora, add_lora, lora_config


def batch_references(batch: dict[str, Any]) -> list[list[torch.Tensor]]:
    """Each sample's reference pixels in [0, 1] (an empty list for a row without one)."""
    if "references" in batch:
        return batch["references"]
    if "conditioning_pixels" in batch:
        return [[pixels] for pixels in batch["conditioning_pixels"]]
    return [[] for _ in batch["captions"]]


def reference_latents(family: Family, parts: Parts, batch: dict[str, Any], device: torch.device,
                      dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """Each sample's references as scaled latents (the posterior mean, as the edit pipelines
    encode them: argmax), from the latent cache when it holds them."""
    with torch.no_grad():
        if "conditioning_latent_mean" in batch:
            mean = batch["conditioning_latent_mean"].to(device)
            latents = family.sample_latents(parts, mean, torch.zeros_like(mean), None)
            return [[latent.to(device=device, dtype=dtype)] for latent in latents]
        encoded = []
        for references in batch_references(batch):
            encoded.append([family.encode_images(parts, pixels[None].to(device) * 2 - 1, None)[0]
                            .to(device=device, dtype=dtype) for pixels in references])
        return encoded


class Edit(AdaptersOrWeights, FromSettings):
    floor_settings: dict[str, Any] | None = None
    """With adapters, the LoRA scale 0: the base's own edit, the metric's floor (set in
    build, where the family names the pipeline argument). A full run has no switch."""
    card_tags = ["image-editing"]
    conditioning_latents = True
    """With data.cache_latents, the cache holds the reference's latents too."""

    def __init__(self, config: EditMethod) -> None:
        super().__init__(config)
        self.lora = Lora(config) if config.lora is not None else None  # its adapter files and checkpoints

    def build(self, family: Family, parts: Parts) -> Trained:
        freeze(parts)
        if self.lora is None:
            return {parts.denoiser_name: trainable_fp32(parts.denoiser)}
        settings = self.config.lora
        self.floor_settings = {family.attention_options: {"scale": 0.0}}
        targets = settings.target_modules or family.lora_targets
        return {parts.denoiser_name: add_lora(parts.denoiser, lora_config(settings, targets))}

    training_data = staticmethod(same_samples)

    def condition(
        self, family: Family, parts: Parts, trained: Trained, batch: dict[str, Any], inputs: ModelInputs
    ) -> ModelInputs:
        latents = reference_latents(family, parts, batch, inputs.noisy.device, inputs.noisy.dtype)
        if family.prompt_sees_references and "text" not in batch:  # (the text cache holds it per row)
            with torch.no_grad():
                text = family.encode_edit_prompts(parts, batch["captions"], batch_references(batch))
            inputs = replace(inputs, text={name: tensor.to(inputs.noisy.device) for name, tensor in text.items()})
        return inputs.with_extra(references=latents)

    reduce = staticmethod(mean_loss)

    def save(self, family: Family, parts: Parts, trained: Trained, out_dir: Path) -> None:
        if self.lora is None:
            save_pipeline(family, parts, trained, out_dir, "edit")
        else:
            family.save_lora(out_dir, trained)

    usage = family_usage

    def generate(self, family: Family, parts: Parts, trained: Trained, prompt: str | list[str],
                 image: Image.Image | list[Image.Image] | None, settings: dict[str, Any],
                 generator: torch.Generator) -> list[Image.Image]:
        """The family's edit pipeline with each prompt's reference image (`image`: one, or a
        list aligned with a list of prompts)."""
        call = family.edit_arguments(image, settings.get("width"), settings.get("height"))
        rest = {key: value for key, value in settings.items() if key not in ("width", "height")}
        return generate_with_trained(family, parts, trained, prompt, rest, generator, "edit", call)
