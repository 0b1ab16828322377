"""model.quantize: a frozen base held in NF4 or int8 (bitsandbytes) or fp8 (torchao), on the CPU here, while
LoRA adapters or a ControlNet train in full precision; the results load in diffusers on
the full-precision base and change or steer its output."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_config
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from difftune.cli import main
from difftune.config import ConfigError, build_config
from difftune.quantization import bytes_per_parameter, quantize_frozen_linears
from difftune.training.loop import train

SETTINGS = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _quantized_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """bitsandbytes' layers, and linears whose weight torchao made a Float8Tensor."""
    return [m for m in module.modules() if "bitsandbytes" in type(m).__module__
            or (type(m) is torch.nn.Linear and hasattr(m.weight, "qdata"))]


@pytest.mark.parametrize("kind, most_bytes", [("nf4", 0.8), ("int8", 1.5), ("fp8", 1.6)])  # fp8: tiny layers (4 inputs) pay a 4-byte scale per row
def test_quantized_linears_stay_close_and_take_fewer_bytes(kind: str, most_bytes: float, tiny_base: Path) -> None:
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").requires_grad_(False).eval()
    linears = [m for m in unet.modules() if type(m) is torch.nn.Linear]
    full_bytes = sum(bytes_per_parameter(m) for m in linears) / len(linears)
    sample = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = unet(sample, torch.tensor([10, 500]), text).sample
        assert quantize_frozen_linears(unet, kind, torch.float32) == len(linears)
        after = unet(sample, torch.tensor([10, 500]), text).sample
    quantized = _quantized_layers(unet)
    assert len(quantized) == len(linears) and full_bytes == 4.0
    assert sum(bytes_per_parameter(m) for m in quantized) / len(quantized) < most_bytes
    relative = ((after - before).norm() / before.norm()).item()
    assert 0 < relative < 0.2  # close to the weights, and not the same (they were quantized)


@pytest.mark.parametrize("kind", ["nf4", "fp8"])
def test_a_lora_trained_on_a_quantized_base_changes_the_full_precision_output(kind: str, tiny_base: Path,
                                                                               circles: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", method={"kind": "lora"}, model={"quantize": kind},
                     train={"max_steps": 4, "learning_rate": 1e-2})
    raw["validation"] = {"every": 100, "prompts": ["red circle with blue background"], "num_images": 1, "steps": 2}
    final = train(build_config(raw))
    events = _events(tmp_path / "run")
    counts = next(e for e in events if e["event"] == "quantized")["linear_layers"]
    assert counts["unet"] > 0 and counts["text_encoder"] > 0
    assert any(e["event"] == "validation" for e in events)  # generated on the quantized base
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, safety_checker=None)
    plain = pipe("red circle", generator=torch.Generator().manual_seed(0), **SETTINGS).images[0]
    pipe.load_lora_weights(final)
    adapted = pipe("red circle", generator=torch.Generator().manual_seed(0), **SETTINGS).images[0]
    assert np.abs(adapted - plain).max() > 1e-3


@pytest.mark.parametrize("kind", ["nf4", "int8", "fp8"])
def test_a_controlnet_trained_on_a_quantized_base_steers_the_full_precision_pipeline(kind: str, tiny_base: Path,
                                                                                    circles: Path,
                                                                                    tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", model={"quantize": kind},
                     train={"max_steps": 4, "learning_rate": 1e-2})
    final = train(build_config(raw))
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_base, controlnet=ControlNetModel.from_pretrained(final), safety_checker=None)
    control = Image.open(circles / "conditioning_images" / "000000.png").convert("RGB")

    def image(scale: float) -> np.ndarray:
        return pipe("red circle", image=control, controlnet_conditioning_scale=scale,
                    generator=torch.Generator().manual_seed(0), **SETTINGS).images[0]

    assert np.abs(image(1.0) - image(0.0)).max() > 1e-3
    # difftune generate on the same base, quantized as it trained
    out = tmp_path / "quantized.png"
    assert main(["generate", "--base", str(tiny_base), "--controlnet", str(tmp_path / "run"), "--image",
                 str(circles / "conditioning_images" / "000000.png"), "--prompt", "red circle", "--steps", "2",
                 "--quantize", kind, "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)


def test_quantize_is_refused_for_methods_that_train_the_whole_denoiser(tiny_base: Path, circles: Path,
                                                                         tmp_path: Path) -> None:
    for method in ({"kind": "full"}, {"kind": "dreambooth", "dreambooth": {"instance_prompt": "a sks circle"}}):
        raw = run_config(tiny_base, circles, tmp_path / "run", method=method, model={"quantize": "nf4"})
        raw["validation"] = {"every": 100}
        with pytest.raises(ConfigError, match=r"model.quantize = 'nf4': method '(full|dreambooth)'( without "
                                              r"\[method.lora\])? trains every weight"):
            build_config(raw)


def test_a_flux_control_lora_trains_on_an_nf4_base(circles: Path, tmp_path: Path) -> None:
    """Control-LoRA on a quantized Flux: the widened input projection trains in full
    precision beside the adapters; diffusers' control pipeline loads the result."""
    from conftest import WORDS
    from diffusers import FluxControlPipeline

    from difftune.families.flux.tiny import build_tiny_flux

    base = build_tiny_flux(tmp_path / "flux", WORDS, seed=0)
    raw = run_config(base, circles, tmp_path / "run", model={"family": "flux", "quantize": "nf4"},
                     train={"max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2})
    raw["method"] = {"kind": "control", "lora": {"rank": 4}}
    raw["validation"] = {"every": 2, "steps": 2, "num_images": 1, "prompts": ["red circle"],
                         "images": [str(circles / "conditioning_images" / "000000.png")]}
    final = train(build_config(raw))
    counts = next(e for e in _events(tmp_path / "run") if e["event"] == "quantized")["linear_layers"]
    assert counts["transformer"] > 0
    pipe = FluxControlPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(final)
    control = Image.open(circles / "conditioning_images" / "000000.png").convert("RGB")

    def image(scale: float) -> np.ndarray:
        return pipe("red circle", control_image=control, num_inference_steps=2, height=32, width=32,
                    output_type="np", joint_attention_kwargs={"scale": scale},
                    generator=torch.Generator().manual_seed(0)).images[0]

    assert not np.allclose(image(0.0), image(1.0), atol=1e-4)


def test_dreambooth_lora_with_prior_preservation_on_an_nf4_base(tiny_base: Path, tmp_path: Path) -> None:
    """The class images are generated by the quantized base itself."""
    from difftune.data.synthetic import write_subject_folder

    subject = write_subject_folder(tmp_path / "subject", 2, 64, seed=0)
    raw = run_config(tiny_base, subject, tmp_path / "run", model={"quantize": "nf4"},
                     method={"kind": "dreambooth", "lora": {"rank": 4},
                             "dreambooth": {"instance_prompt": "a sks circle", "class_prompt": "a circle",
                                            "prior_preservation": True, "num_class_images": 2,
                                            "class_generation_steps": 2, "class_data": str(tmp_path / "class")}},
                     train={"max_steps": 2})
    raw["validation"] = {"every": 100}
    final = train(build_config(raw))
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert (final / "pytorch_lora_weights.safetensors").is_file()
