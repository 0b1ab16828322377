"""A random-weight Qwen-Image-Edit (or Edit Plus) pipeline at toy sizes, built locally
(tests): the tiny Qwen-Image parts (families/qwenimage/tiny.py) and a processor whose
image processor shows the vision tower at most 56x56 pixels (4 image tokens), so the
encoder stays cheap whatever size a reference has."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from difftune.families.qwenimage.tiny import QWENIMAGE_SIZES, tiny_parts, write_qwen_tokenizer

MAX_PIXELS = 56 * 56
"""The most pixels the processor shows the vision tower: 4x4 patches of 14, merged 2x2."""


def build_tiny_qwenimage_edit(out_dir: str | Path, words: list[str], size: str = "edit", seed: int = 0,
                              plus: bool = False) -> Path:
    """Build and save a random-weight QwenImageEditPipeline (QwenImageEditPlusPipeline with
    `plus`): VAE, transformer, Qwen2.5-VL with its vision tower, tokenizer and processor."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = write_qwen_tokenizer(Path(scratch), words)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    cls(tokenizer=tokenizer, processor=None, **tiny_parts(QWENIMAGE_SIZES[size], tokenizer, seed)).save_pretrained(out)
    # The processor's files, written as Qwen2VLProcessor.save_pretrained writes them: transformers
    # 5 builds no Qwen2VLProcessor without torchvision (its video processor), so none is
    # built here (qwenimage_edit.family.load_processor reads the folder either way).
    tokenizer.save_pretrained(out / "processor")
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=MAX_PIXELS)
    images.save_pretrained(out / "processor")
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "size": dict(images.size),
             "patch_size": images.patch_size, "temporal_patch_size": images.temporal_patch_size,
             "merge_size": images.merge_size}
    (out / "processor" / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    index = json.loads((out / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
