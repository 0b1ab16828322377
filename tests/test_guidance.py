"""Classifier-free guidance as each family's pipelines take it: validation.guidance_scale and
`difftune generate --guidance-scale` guide Qwen-Image (true_cfg_scale with a negative prompt)
as they guide the families whose pipelines read guidance_scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import QwenImagePipeline

from difftune.config import ModelConfig
from difftune.families import get_family
from difftune.methods.full.method import generate_with_trained

ROOT = Path(__file__).resolve().parents[1]
QWEN_BASE = ROOT / "assets" / "fill-circles-base-qwen"
PROMPTS = ["red circle with blue background", "yellow circle with black background"]


def _images(pipe: QwenImagePipeline, **call: object) -> np.ndarray:
    return pipe(prompt=PROMPTS, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), max_sequence_length=512, **call).images


def test_qwen_image_guides_with_true_cfg_and_the_empty_caption_per_prompt() -> None:
    family = get_family("qwenimage")
    pipe = QwenImagePipeline.from_pretrained(QWEN_BASE)
    pipe.set_progress_bar_config(disable=True)
    assert family.guidance_arguments(pipe, 1.0, 2) == {"true_cfg_scale": 1.0}
    assert family.guidance_arguments(pipe, 4.0, 2) == {"true_cfg_scale": 4.0, "negative_prompt": ["", ""]}
    assert get_family("qwenimage_edit").guidance_arguments(pipe, 3.0, 1)["negative_prompt"] == [""]
    assert get_family("flux").guidance_arguments(None, 3.5, 2) == {"guidance_scale": 3.5}
    unguided = _images(pipe, **family.guidance_arguments(pipe, 1.0, 2))
    guided = _images(pipe, **family.guidance_arguments(pipe, 4.0, 2))
    assert guided.shape == unguided.shape == (2, 64, 64, 3)
    assert not np.allclose(guided, unguided, atol=1e-3), "guidance changed nothing"
    # what diffusers' guidance_scale alone gives Qwen-Image: nothing (it is for distilled bases)
    assert np.allclose(_images(pipe, guidance_scale=4.0, true_cfg_scale=1.0), unguided, atol=1e-6)


def test_validation_settings_guide_through_the_family() -> None:
    """generate_with_trained (validation, the metric, the floor) guides as the family's
    pipeline call with its guidance arguments does, two images per prompt."""
    family = get_family("qwenimage")
    parts = family.load(ModelConfig(pretrained=str(QWEN_BASE), family="qwenimage"))
    settings = {"num_inference_steps": 3, "height": 64, "width": 64, "num_images_per_prompt": 2}
    images = {scale: generate_with_trained(family, parts, {}, PROMPTS, settings | {"guidance_scale": scale},
                                           torch.Generator().manual_seed(0))
              for scale in (1.0, 4.0)}
    assert len(images[4.0]) == 4
    guided, unguided = (np.stack([np.asarray(i, dtype=np.float32) for i in images[s]]) for s in (4.0, 1.0))
    assert np.abs(guided - unguided).max() > 2, "validation's guidance changed nothing"
    pipe = family.pipeline(parts)
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(prompt=PROMPTS, generator=torch.Generator().manual_seed(0), true_cfg_scale=4.0,
                  negative_prompt=["", ""], max_sequence_length=512, **settings).images
    assert np.array_equal(np.stack([np.asarray(i) for i in direct]), guided.astype(np.uint8))
