"""Qwen-Image as the catalog lists it (no code of the family loads)."""

from difftune.catalog import FamilyFacts

FACTS = FamilyFacts(
    name="qwenimage",
    description="Qwen-Image",
    capabilities=frozenset({"controlnet", "lora"}),
    objective_kind="flow_matching",
    default_resolution=1024,
    denoiser_name="transformer",
    denoiser_class="QwenImageTransformer2DModel",
    text_encoder_classes={"text_encoder": "Qwen2_5_VLForConditionalGeneration"},
    pipeline_classes={"text_to_image": "QwenImagePipeline", "controlnet": "QwenImageControlNetPipeline"},
    caches_text=True,  # each prompt kept unpadded, padded per batch as the encoder pads (samples.stack_padded)
    mixed_precisions=("no", "bf16"),  # Qwen-Image is run in bf16; its activations overflow fp16
    text_encoder_trainable=False,  # diffusers' Qwen-Image LoRA loader reads the transformer's adapters alone
    controlnet_blocks=True,  # method.controlnet_double_blocks: the transformer blocks a new ControlNet copies
)
