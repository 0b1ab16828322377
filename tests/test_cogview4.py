"""CogView4: the prompt (padded as the pipeline pads it), the size conditioning and the
time checked against diffusers' own CogView4Pipeline; Control at step zero is the base;
what the config refuses for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import WORDS, run_config
from diffusers import CogView4Pipeline

from difftune.config import ConfigError, build_config
from difftune.families import ModelInputs, get_family
from difftune.families.cogview4.tiny import build_tiny_cogview4

PROMPT = "red circle with blue background"


@pytest.fixture(scope="module")
def tiny_cogview4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cogview4(tmp_path_factory.mktemp("cogview4") / "tiny-cogview4", WORDS, seed=0)


def _run(base: Path, data: Path, **method) -> dict:
    raw = run_config(base, data, Path("out"), validation={"every": 2, "steps": 2, "prompts": [PROMPT]})
    raw["model"]["family"] = "cogview4"
    raw["method"] = method
    return raw


def test_prompt_sizes_and_time_are_what_the_pipeline_uses(tiny_cogview4: Path) -> None:
    family = get_family("cogview4")
    parts = family.load(build_config(_run(tiny_cogview4, Path("."), kind="lora")).model)
    pipe = CogView4Pipeline.from_pretrained(tiny_cogview4)
    captions = [PROMPT, "red"]
    text = family.encode_prompts(parts, captions)
    embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    assert text["hidden_states"].shape[1] % 16 == 0 and torch.equal(text["hidden_states"], embeds)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([250.0, 900.0])
    geometry = torch.tensor([[20, 16, 2, 0, 16, 16], [16, 16, 0, 0, 16, 16]])  # 8x8 latents, VAE factor 2
    with torch.no_grad():
        ours = family.predict(parts, ModelInputs(latents, timesteps, text, geometry))
        theirs = pipe.transformer(hidden_states=latents, encoder_hidden_states=embeds, timestep=timesteps,
                                  original_size=geometry[:, :2].float(), target_size=geometry[:, 4:].float(),
                                  crop_coords=geometry[:, 2:4].float(), return_dict=False)[0]
        plain = family.predict(parts, ModelInputs(latents, timesteps, text))  # no geometry: its target size
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours[:1], plain[:1]) and torch.equal(ours[1:], plain[1:])


def test_the_shift_is_the_pipelines(tiny_cogview4: Path) -> None:
    from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

    family = get_family("cogview4")
    parts = family.load(build_config(_run(tiny_cogview4, Path("."), kind="lora")).model)
    config = parts.noise_scheduler.config
    for tokens in (16, 256, 4096):
        assert family.shift_mu(parts)(tokens) == pytest.approx(
            calculate_shift(tokens, config.base_image_seq_len, config.base_shift, config.max_shift))


def test_control_at_step_zero_is_the_base_exactly(tiny_cogview4: Path, circles: Path) -> None:
    from difftune.methods import make_method

    family = get_family("cogview4")
    raw = _run(tiny_cogview4, circles, kind="control")
    raw["validation"]["images"] = [str(circles / "conditioning_images" / "000000.png")]
    config = build_config(raw)
    parts = family.load(config.model)
    text = family.encode_prompts(parts, [PROMPT, ""])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = ModelInputs(latents, torch.tensor([250.0, 900.0]), text)
    with torch.no_grad():
        before = family.predict(parts, inputs)
        make_method(config.method).build(family, parts)
        control = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        after = family.predict(parts, ModelInputs(torch.cat([latents, control], 1), inputs.timesteps, text))
    assert parts.denoiser.config.in_channels == 8 and parts.denoiser.patch_embed.proj.in_features == 32
    assert torch.equal(before, after)


@pytest.mark.parametrize(("section", "values", "message"), [
    ("train", {"mixed_precision": "fp16"}, "train.mixed_precision = 'fp16': family 'cogview4' trains in 'no' or 'bf16'"),
    ("data", {"cache_text": True}, "data.cache_text: family 'cogview4' encodes a caption differently in each batch"),
    ("method", {"train_text_encoder": True}, "method.train_text_encoder: family 'cogview4' trains its transformer"),
])
def test_the_config_refuses_what_cogview4_cannot_do(tiny_cogview4: Path, circles: Path, section: str,
                                                    values: dict, message: str) -> None:
    raw = _run(tiny_cogview4, circles, kind="lora")
    raw[section] |= values
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(raw)


def test_a_control_lora_also_writes_the_fused_transformer_cogview4_loads(tiny_cogview4: Path, circles: Path,
                                                                        tmp_path: Path) -> None:
    """CogView4ControlPipeline has no LoRA loader: final/transformer/ holds the adapters
    fused into the widened transformer, which the control pipeline takes as it is."""
    import numpy as np
    from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel
    from PIL import Image

    from difftune.training.loop import train

    raw = _run(tiny_cogview4, circles, kind="control", lora={"rank": 4})
    raw["train"] |= {"output_dir": str(tmp_path / "run"), "max_steps": 2, "learning_rate": 1e-2}
    raw["validation"]["images"] = [str(circles / "conditioning_images" / "000000.png")]
    final = train(build_config(raw))
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    transformer = CogView4Transformer2DModel.from_pretrained(final, subfolder="transformer")
    assert transformer.config.in_channels == 8
    pipe = CogView4ControlPipeline.from_pretrained(tiny_cogview4, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    control = Image.open(circles / "conditioning_images" / "000000.png").convert("RGB")
    image = pipe(PROMPT, control_image=control, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.isfinite(image).all()
    import subprocess
    import sys

    out = tmp_path / "out.png"  # the CLI loads the fused transformer into the control pipeline
    done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--lora", str(tmp_path / "run"),
                           "--image", str(circles / "conditioning_images" / "000000.png"), "--prompt", PROMPT,
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (64, 64)
    from difftune.methods import make_method

    usage = make_method(build_config(raw).method).usage(get_family("cogview4"), "me/run", "base")
    assert 'CogView4Transformer2DModel.from_pretrained("me/run", subfolder="transformer")' in usage
