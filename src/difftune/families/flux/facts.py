"""FLUX.1 as the catalog lists it (no code of the family loads)."""

from difftune.catalog import FamilyFacts

FACTS = FamilyFacts(
    name="flux",
    description="FLUX.1",
    capabilities=frozenset({"controlnet", "control", "lora", "edit"}),  # edit: FLUX.1 Kontext
    objective_kind="flow_matching",
    default_resolution=1024,
    denoiser_name="transformer",
    denoiser_class="FluxTransformer2DModel",
    text_encoder_classes={"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"},
    pipeline_classes={"text_to_image": "FluxPipeline", "control": "FluxControlPipeline",
                      "controlnet": "FluxControlNetPipeline", "edit": "FluxKontextPipeline"},
    controlnet_blocks=True,  # method.controlnet_double_blocks / _single_blocks choose the ControlNet's depth
)
