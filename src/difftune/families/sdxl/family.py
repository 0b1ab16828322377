"""Stable Diffusion XL (Podell et al. 2023): two CLIP text encoders and a UNet that also
conditions on the pooled text embedding and on each image's size and crop.

What differs from SD 1.x/2.x, as diffusers' SDXL pipelines and training scripts do it:
- the prompt: the penultimate hidden states of both encoders, concatenated, and the
  projected pooled output of the second ("pooled");
- the "time ids": (original height, width, crop top, left, target height, width) of each
  sample, which the transforms record (`ModelInputs.geometry`), passed with the pooled
  embedding as the UNet's (and ControlNet's) added conditions;
- its pipelines, licence, tags, LoRA and single-file names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.families.base import ModelInputs, Parts, device_of
from difftune.families.sd.family import StableDiffusion
from difftune.families.sdxl.facts import FACTS

if TYPE_CHECKING:
    import torch


class StableDiffusionXL(StableDiffusion):
    facts = FACTS
    tokenizer_names = ("tokenizer", "tokenizer_2")
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya_unet_names = "original"  # sd-scripts' SDXL UNet is the SGM one: input_blocks_4_1_...
    license = "openrail++"
    card_tags = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers", "text-to-image"]
    # No invisible watermark on validation images (diffusers adds one when the package is installed).
    pipeline_options: dict[str, Any] = {"add_watermarker": False}

    def encode_prompts(self, parts: Parts, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch

        hidden, pooled = [], None
        for tokenizer_name, encoder_name in zip(self.tokenizer_names, self.text_encoder_names):
            encoder = parts.components[encoder_name]
            ids = self.token_ids(parts.components[tokenizer_name], captions).to(device_of(encoder))
            output = encoder(ids, output_hidden_states=True)
            pooled = output[0]  # the last encoder's is kept: CLIPTextModelWithProjection's text_embeds
            hidden.append(output.hidden_states[-2])
        text = {"hidden_states": torch.cat(hidden, dim=-1), "pooled": pooled}
        if self.zeros_for_empty_prompt(parts):
            keep = torch.tensor([bool(caption) for caption in captions], device=pooled.device)
            text = {name: value * keep.view(-1, *[1] * (value.dim() - 1)).to(value.dtype)
                    for name, value in text.items()}
        return text

    def zeros_for_empty_prompt(self, parts: Parts) -> bool:
        """SDXL's pipelines condition the unconditional half of classifier-free guidance on
        zeros, not on the encoded "" (force_zeros_for_empty_prompt, True unless the base's
        model_index.json says otherwise), as SGM trained SDXL (a dropped prompt is zeroed).
        So a dropped or empty caption trains on zeros here too; diffusers'
        train_controlnet_sdxl.py encodes "" instead, which CFG then never shows the model."""
        return bool(parts.settings.get("force_zeros_for_empty_prompt", True))

    def text_cache_identity(self, parts: Parts) -> dict[str, Any]:
        return {**super().text_cache_identity(parts), "zeros_for_empty_prompt": self.zeros_for_empty_prompt(parts)}

    def added_conditions(self, inputs: ModelInputs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if inputs.geometry is None:
            raise ValueError("SDXL needs each sample's geometry (original size, crop, target size) for its time ids")
        return {"text_embeds": inputs.text["pooled"].to(dtype),
                "time_ids": inputs.geometry.to(device=inputs.noisy.device, dtype=dtype)}

    def original_unet_names(self, config: dict) -> Callable[[str], str]:
        """diffusers' UNet module paths -> the SGM layout's (`down_blocks.1.attentions.0` ->
        `input_blocks.4.1`), as sd-scripts names SDXL LoRA modules: the single-file mapping."""
        from difftune.families.sdxl.single_file import sdxl_unet_rules
        from difftune.layouts.rules import place

        rules = sdxl_unet_rules(config)

        def name(module: str) -> str:
            placed = place(module + ".weight", rules)
            if placed is None:
                raise ValueError(f"unet module {module} has no place in the original SDXL layout")
            return placed[0].removesuffix(".weight")

        return name

    def export_single_file(self, pipeline_dir: Path, out_file: Path, half: bool) -> Path:
        from difftune.families.sdxl.single_file import export_sdxl_single_file

        return export_sdxl_single_file(pipeline_dir, out_file, half=half)


FAMILY = StableDiffusionXL()
