"""Stable Diffusion 1.x / 2.x as the catalog lists it (no code of the family loads)."""

from difftune.catalog import FamilyFacts

FACTS = FamilyFacts(
    name="sd",
    description="Stable Diffusion 1.x and 2.x",
    # consistency_distillation: a DDPM (epsilon or v) UNet a DDIM solver steps as an LCM
    # teacher, and pipelines that sample its LCM-LoRA with LCMScheduler (methods/distill)
    capabilities=frozenset({"controlnet", "lora", "token_embeddings", "single_file", "consistency_distillation"}),
    objective_kind="ddpm",
    default_resolution=512,
    denoiser_name="unet",
    denoiser_class="UNet2DConditionModel",
    text_encoder_classes={"text_encoder": "CLIPTextModel"},
    pipeline_classes={"text_to_image": "StableDiffusionPipeline", "controlnet": "StableDiffusionControlNetPipeline"},
)
