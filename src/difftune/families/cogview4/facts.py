"""CogView4 as the catalog lists it (no code of the family loads)."""

from difftune.catalog import FamilyFacts

FACTS = FamilyFacts(
    name="cogview4",
    description="CogView4",
    capabilities=frozenset({"control", "lora"}),
    objective_kind="flow_matching",
    default_resolution=1024,
    denoiser_name="transformer",
    denoiser_class="CogView4Transformer2DModel",
    text_encoder_classes={"text_encoder": "GlmModel"},
    pipeline_classes={"text_to_image": "CogView4Pipeline", "control": "CogView4ControlPipeline"},
    caches_text=False,  # the prompt is padded to the batch's longest: another embedding in each batch
    mixed_precisions=("no", "bf16"),  # CogView4 overflows in fp16
    text_encoder_trainable=False,  # diffusers' CogView4 LoRA loader reads the transformer's adapters alone
)
