"""Inference with trained weights."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
from PIL import Image


def controlnet_folder(path: str) -> str:
    """A ControlNet folder, a run directory (its final/) or a Hub id."""
    candidate = Path(path)
    if (candidate / "final" / "config.json").is_file():
        return str(candidate / "final")
    return path


def generate_controlnet(
    base: str,
    controlnet: str,
    image: str,
    prompt: str,
    out: str,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 7.5,
    conditioning_scale: float = 1.0,
    negative_prompt: str | None = None,
    resolution: int | None = None,
) -> Path:
    """Generate one image with UniPC from a base pipeline and a ControlNet."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    with Image.open(image) as opened:
        control = opened.convert("RGB")
    if resolution is not None:
        control = control.resize((resolution, resolution), Image.Resampling.BILINEAR)
    net = ControlNetModel.from_pretrained(controlnet_folder(controlnet), torch_dtype=dtype)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base, controlnet=net, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype
    ).to(device)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    result = pipe(
        prompt,
        image=control,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        controlnet_conditioning_scale=conditioning_scale,
        negative_prompt=negative_prompt,
        height=control.height,
        width=control.width,
        generator=torch.Generator(device).manual_seed(seed),
    ).images[0]
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result.save(out_path)
    return out_path
