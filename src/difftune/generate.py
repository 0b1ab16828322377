"""Inference with trained weights: a ControlNet, a LoRA, or a full fine-tune's pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image


def run_output(path: str) -> str:
    """A run directory stands for its final/; anything else (a folder, a file, a Hub
    id) is returned as given."""
    candidate = Path(path)
    if (candidate / "final").is_dir() and (candidate / "events.jsonl").is_file():
        return str(candidate / "final")
    return path


def controlnet_folder(path: str) -> str:
    """A ControlNet folder, a run directory (its final/) or a Hub id."""
    return run_output(path)


def generate(
    base: str,
    prompt: str,
    out: str,
    controlnet: str | None = None,
    image: str | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
    steps: int = 20,
    seed: int = 0,
    guidance_scale: float = 7.5,
    conditioning_scale: float = 1.0,
    negative_prompt: str | None = None,
    resolution: int | None = None,
) -> Path:
    """Generate one image with UniPC. `base` may be a full fine-tune run; `controlnet`
    needs a conditioning `image`; `lora` is a LoRA run, folder or file."""
    if (controlnet is None) != (image is None):
        raise ValueError("--controlnet and --image go together")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    common = {"safety_checker": None, "requires_safety_checker": False, "dtype": dtype}
    call: dict = {}
    if controlnet is not None:
        control = _conditioning(image, resolution)
        net = ControlNetModel.from_pretrained(controlnet_folder(controlnet), dtype=dtype)
        pipe = StableDiffusionControlNetPipeline.from_pretrained(run_output(base), controlnet=net, **common)
        call = {"image": control, "controlnet_conditioning_scale": conditioning_scale,
                "height": control.height, "width": control.width}
    else:
        pipe = StableDiffusionPipeline.from_pretrained(run_output(base), **common)
        if resolution is not None:
            call = {"height": resolution, "width": resolution}
    if lora is not None:
        pipe.load_lora_weights(run_output(lora))
        call["cross_attention_kwargs"] = {"scale": lora_scale}
    pipe = pipe.to(device)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    result = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        generator=torch.Generator(device).manual_seed(seed),
        **call,
    ).images[0]
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result.save(out_path)
    return out_path


def _conditioning(path: str | None, resolution: int | None) -> Image.Image:
    with Image.open(path) as opened:  # type: ignore[arg-type]
        control = opened.convert("RGB")
    if resolution is not None:
        control = control.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return control
