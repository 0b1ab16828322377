"""Stable Diffusion 3 / 3.5 as the catalog lists it (no code of the family loads)."""

from difftune.catalog import FamilyFacts

FACTS = FamilyFacts(
    name="sd3",
    description="Stable Diffusion 3 / 3.5",
    capabilities=frozenset({"controlnet", "lora"}),  # no "control": diffusers has no SD3 Control pipeline
    objective_kind="flow_matching",
    default_resolution=1024,
    denoiser_name="transformer",
    denoiser_class="SD3Transformer2DModel",
    text_encoder_classes={"text_encoder": "CLIPTextModelWithProjection",
                          "text_encoder_2": "CLIPTextModelWithProjection", "text_encoder_3": "T5EncoderModel"},
    pipeline_classes={"text_to_image": "StableDiffusion3Pipeline",
                      "controlnet": "StableDiffusion3ControlNetPipeline"},
    controlnet_blocks=True,  # method.controlnet_double_blocks: the joint blocks a new ControlNet copies
)
