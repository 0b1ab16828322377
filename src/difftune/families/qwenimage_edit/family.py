"""Qwen-Image-Edit (Qwen team 2025): Qwen-Image whose text encoder, Qwen2.5-VL, reads the
reference image(s) beside the instruction, and whose transformer sees the references'
latents after the target's tokens (families/qwenimage/family.py: predict).

As diffusers' QwenImageEditPipeline and QwenImageEditPlusPipeline:
- a reference's latents: the image resized to about one megapixel at its own aspect ratio
  (calculate_dimensions(1024 * 1024, ratio), sides multiples of 32), encoded as the
  target's (the posterior's mean), packed after the target's tokens;
- the instruction: the edit template with the reference, as the processor (a
  Qwen2VLProcessor) prepares it, the system prefix (64 tokens) dropped, not cut; Edit
  Plus (a base whose model_index.json names QwenImageEditPlusPipeline, or any sample with
  several references) writes "Picture N: " and each image's vision tokens before the
  instruction, the images at about 384x384 (CONDITION_IMAGE_SIZE) for the encoder;
- a sample without a reference: encoded and predicted as text-to-image (QwenImagePipeline).
The instruction's embedding depends on the references: the text cache keeps one per row and caption.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from difftune.families.base import Parts
from difftune.families.qwenimage.family import PICTURE, QwenImage, prompt_template
from difftune.families.qwenimage_edit.facts import FACTS

if TYPE_CHECKING:
    import torch

    from difftune.config import ModelConfig

PLUS_CLASS = "QwenImageEditPlusPipeline"


def load_processor(base: str, revision: str | None = None) -> Any:
    """The base's processor/ as a Qwen2VLProcessor. transformers 5 loads a video processor
    with every Qwen2VLProcessor, and that needs torchvision; without it, the same tokenizer
    and image processor (its PIL version) in a Qwen2VLProcessor that takes no video, which
    the edit pipelines call alike (they pass images only)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return Qwen2VLProcessor.from_pretrained(base, subfolder="processor", revision=revision)
    return _images_only()(AutoImageProcessor.from_pretrained(base, subfolder="processor", revision=revision),
                          AutoTokenizer.from_pretrained(base, subfolder="processor", revision=revision))


@functools.cache
def _images_only() -> type:
    """Qwen2VLProcessor without its video processor (its __init__ checks every processor it
    names, and the video one's class cannot load without torchvision)."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImagesOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any) -> None:
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    # saved (a pipeline's model_index.json, processor_config.json) as the class it stands in
    # for, so that a folder written here loads wherever torchvision is installed
    ImagesOnlyQwen2VLProcessor.__module__ = Qwen2VLProcessor.__module__
    ImagesOnlyQwen2VLProcessor.__name__ = ImagesOnlyQwen2VLProcessor.__qualname__ = "Qwen2VLProcessor"
    return ImagesOnlyQwen2VLProcessor


def is_plus(base: str, revision: str | None = None) -> bool:
    """Whether a base is an Edit Plus model (its model_index.json's _class_name)."""
    from difftune.model_files import read_config

    return (read_config(base, "model_index.json", revision) or {}).get("_class_name") == PLUS_CLASS


class QwenImageEdit(QwenImage):
    facts = FACTS
    card_tags = ["qwen-image", "image-editing"]
    prompt_sees_references = True
    references_at_target_size = False
    """References are encoded at about a megapixel whatever the target's size (`reference_size`)."""

    @property
    def components(self) -> dict[str, str]:
        """The Qwen-Image parts and the processor (its tokenizer files and image processor)."""
        return {**super().components, "processor": "tokenizer"}

    def load(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        """The Qwen-Image parts, the processor, and (in settings, which no pipeline takes) the
        base's pipeline class, which says how instructions are encoded."""
        from dataclasses import replace

        parts = super().load(config, denoiser_in_memory)
        processor = load_processor(config.pretrained, config.revision)
        plus = is_plus(config.pretrained, config.revision)
        return replace(parts.with_modules({"processor": processor}),
                       settings={**parts.settings, "_class_name": PLUS_CLASS if plus else "QwenImageEditPipeline"})

    def max_references(self, base: str, revision: str | None = None) -> int | None:
        """QwenImageEditPipeline takes one reference; QwenImageEditPlusPipeline any number."""
        return None if is_plus(base, revision) else 1

    # --- edit --------------------------------------------------------------------------------

    def reference_size(self, reference: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
        """About one megapixel at the reference's aspect ratio, whatever the target's size,
        as both edit pipelines size the image they encode with the VAE."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE, calculate_dimensions

        width, height = calculate_dimensions(VAE_IMAGE_SIZE, reference[0] / reference[1])
        return int(width), int(height)

    def encode_edit_prompts(
        self, parts: Parts, captions: list[str], references: list[list[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Each instruction with its references as the edit pipeline's encode_prompt sees them
        (rows without one as text-to-image), padded to the batch's longest with a mask."""
        import torch

        from difftune.families.edit import reference_pixels

        plus_base = parts.settings.get("_class_name") == PLUS_CLASS
        kinds: dict[str, list[int]] = {"plain": [], "edit": [], "plus": []}
        for index, images in enumerate(references):  # each row as the pipeline that takes it encodes it
            kinds["plain" if not images else "plus" if plus_base or len(images) > 1 else "edit"].append(index)
        groups = []
        if kinds["plain"]:
            groups.append((kinds["plain"], self.encode_prompts(parts, [captions[i] for i in kinds["plain"]])))
        for kind in ("edit", "plus"):
            if kinds[kind]:
                inputs, drop = self._edit_inputs(parts, [captions[i] for i in kinds[kind]],
                                                 [reference_pixels(references[i]) for i in kinds[kind]], kind == "plus")
                groups.append((kinds[kind], self._encode(parts, inputs, drop, None)))
        longest = max(group["mask"].shape[1] for _, group in groups)
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for indices, group in groups:
            hidden, mask = group["hidden_states"], group["mask"]
            hidden = torch.cat([hidden, hidden.new_zeros(len(indices), longest - hidden.shape[1], hidden.shape[2])], 1)
            mask = torch.cat([mask, mask.new_zeros(len(indices), longest - mask.shape[1])], 1)
            rows.update({index: (hidden[n], mask[n]) for n, index in enumerate(indices)})
        order = range(len(captions))
        return {"hidden_states": torch.stack([rows[i][0] for i in order]),
                "mask": torch.stack([rows[i][1] for i in order])}

    def _edit_inputs(self, parts: Parts, captions: list[str], images: list[list[Any]],
                     plus: bool) -> tuple[dict[str, Any], int]:
        """The processor's inputs for instructions with their PIL references, and the tokens
        of the template's system prefix: QwenImageEditPipeline's template and the image at
        its VAE size, or QwenImageEditPlusPipeline's with a "Picture N" block per image,
        each at about 384x384."""
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
            CONDITION_IMAGE_SIZE,
            VAE_IMAGE_SIZE,
            calculate_dimensions,
        )

        template, drop, _ = prompt_template(PLUS_CLASS if plus else "QwenImageEditPipeline")
        resizer = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor(parts) * 2)  # as the pipelines' own
        area = CONDITION_IMAGE_SIZE if plus else VAE_IMAGE_SIZE
        texts, shown = [], []
        for caption, row in zip(captions, images):
            blocks = "".join(PICTURE.format(number + 1) for number in range(len(row))) if plus else ""
            texts.append(template.format(blocks + caption))
            for image in row:
                width, height = calculate_dimensions(area, image.width / image.height)[:2]
                shown.append(resizer.resize(image, height, width))
        inputs = parts.components["processor"](text=texts, images=shown, padding=True, return_tensors="pt")
        return dict(inputs), drop

    def edit_arguments(self, image: Any, width: int | None, height: int | None) -> dict[str, Any]:
        """The pipeline's `image` as given (QwenImageEditPipeline: one reference, or a list with
        one per prompt; QwenImageEditPlusPipeline, one prompt at a time: a list of its
        references), and the target's size where one is given (else the pipelines make the
        reference's, about a megapixel)."""
        size = {key: value for key, value in (("height", height), ("width", width)) if value}
        return size if image is None else {"image": image, **size}

    # --- pipelines -------------------------------------------------------------------------

    def pipeline(self, parts: Parts, kind: str | None = None) -> Any:
        """As Qwen-Image's; an edit pipeline over an Edit Plus base is Edit Plus (its template)."""
        if kind == "edit" and parts.settings.get("_class_name") == PLUS_CLASS:
            kind = "edit_plus"
        return super().pipeline(parts, kind)

    def load_pipeline(self, base: str, dtype: Any, controlnet: Any = None, kind: str | None = None,
                      **parts: Any) -> Any:
        import inspect

        if kind == "edit" and is_plus(base):
            kind = "edit_plus"
        if "processor" in inspect.signature(self.pipeline_class(kind or "text_to_image").__init__).parameters:
            parts.setdefault("processor", load_processor(base))  # (loadable without torchvision)
        return super().load_pipeline(base, dtype, controlnet, kind, **parts)


FAMILY = QwenImageEdit()
