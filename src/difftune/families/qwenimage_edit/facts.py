"""Qwen-Image-Edit as the catalog lists it (no code of the family loads)."""

from difftune.catalog import FamilyFacts

FACTS = FamilyFacts(
    name="qwenimage_edit",
    description="Qwen-Image-Edit",
    capabilities=frozenset({"edit", "lora"}),
    objective_kind="flow_matching",
    default_resolution=1024,
    denoiser_name="transformer",
    denoiser_class="QwenImageTransformer2DModel",
    text_encoder_classes={"text_encoder": "Qwen2_5_VLForConditionalGeneration"},
    # a QwenImagePipeline folder is family "qwenimage": the catalog meets that family first
    # (by name); this one's text-to-image pipeline runs what its text-to-image methods train
    pipeline_classes={"text_to_image": "QwenImagePipeline", "edit": "QwenImageEditPipeline",
                      "edit_plus": "QwenImageEditPlusPipeline"},
    caches_text=True,  # unpadded, as Qwen-Image's; an instruction per row and caption (it sees the references)
    mixed_precisions=("no", "bf16"),  # run in bf16, as Qwen-Image; its activations overflow fp16
    text_encoder_trainable=False,  # diffusers' Qwen-Image LoRA loader reads the transformer's adapters alone
)
