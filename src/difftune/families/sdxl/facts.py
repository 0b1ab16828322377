"""Stable Diffusion XL as the catalog lists it: SD's facts with two text encoders."""

from dataclasses import replace

from difftune.families.sd.facts import FACTS as SD

FACTS = replace(
    SD,
    name="sdxl",
    description="Stable Diffusion XL",
    default_resolution=1024,
    text_encoder_classes={"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"},
    pipeline_classes={"text_to_image": "StableDiffusionXLPipeline", "controlnet": "StableDiffusionXLControlNetPipeline"},
)
