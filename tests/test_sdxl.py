"""SDXL: what differs from SD (two encoders, pooled embedding, time ids from each sample's
geometry) checked against diffusers' own SDXL pipeline; its LoRA in the kohya names and
its single-file checkpoint read back by diffusers; bad input named before models load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, run_config
from diffusers import StableDiffusionXLPipeline, UniPCMultistepScheduler
from safetensors.torch import load_file

from difftune.config import build_config
from difftune.errors import UserError
from difftune.export.hub import write_model_card
from difftune.export.lora import export_lora
from difftune.families import ModelInputs, get_family
from difftune.families.sdxl.tiny import build_tiny_sdxl
from difftune.training.loop import train
from difftune.training.plan import plan_run

PROMPT = "red circle with blue background"


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", WORDS, seed=0)


def _sdxl_run(base: Path, data: Path, out: Path, **method) -> dict:
    raw = run_config(base, data, out, train={"max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2},
                     validation={"every": 100})
    raw["model"]["family"] = "sdxl"
    raw["method"] = method
    return raw


def _pipeline(base: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(base, add_watermarker=False)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_prompts_and_time_ids_are_what_the_sdxl_pipeline_uses(tiny_sdxl: Path) -> None:
    family = get_family("sdxl")
    config = build_config(_sdxl_run(tiny_sdxl, Path("."), Path("."), kind="lora"))
    parts = family.load(config.model)
    text = family.encode_prompts(parts, [PROMPT, PROMPT])
    pipe = _pipeline(tiny_sdxl)
    hidden, _, pooled, _ = pipe.encode_prompt([PROMPT, PROMPT], do_classifier_free_guidance=False)
    assert torch.equal(text["hidden_states"], hidden) and torch.equal(text["pooled"], pooled)
    # the pipeline's own time ids for a 64 px image: (64, 64, 0, 0, 64, 64)
    time_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    noisy = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    geometry = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)
    inputs = ModelInputs(noisy, torch.tensor([10, 500]), text, geometry)
    with torch.no_grad():
        ours = family.predict(parts, inputs)
        theirs = pipe.unet(noisy, torch.tensor([10, 500]), encoder_hidden_states=hidden,
                           added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(2, 1)}).sample
        cropped = family.predict(parts, ModelInputs(noisy, inputs.timesteps, text, geometry + torch.tensor(
            [0, 0, 8, 8, 0, 0])))
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, cropped)  # the crop reaches the UNet


@pytest.mark.parametrize("force_zeros", [True, False])
def test_an_empty_prompt_trains_on_what_guidance_uses_for_no_prompt(tiny_sdxl: Path, tmp_path: Path,
                                                                    force_zeros: bool) -> None:
    """The unconditional half of CFG in SDXL's pipeline is zeros when the base says
    force_zeros_for_empty_prompt (else the encoded ""): a dropped caption trains on the same."""
    base = tmp_path / "base"
    _pipeline(tiny_sdxl).save_pretrained(base)
    index = base / "model_index.json"
    index.write_text(index.read_text().replace('"force_zeros_for_empty_prompt": true',
                                               f'"force_zeros_for_empty_prompt": {str(force_zeros).lower()}'))
    family = get_family("sdxl")
    parts = family.load(build_config(_sdxl_run(base, Path("."), Path("."), kind="lora")).model)
    assert parts.settings["force_zeros_for_empty_prompt"] is force_zeros
    text = family.encode_prompts(parts, ["", PROMPT])
    pipe = _pipeline(base)
    _, negative, _, negative_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    # (batch of two here, of one in the pipeline: the same to float rounding)
    assert torch.allclose(text["hidden_states"][:1], negative, atol=1e-6)
    assert torch.allclose(text["pooled"][:1], negative_pooled, atol=1e-6)
    assert bool(negative.abs().sum() == 0) is force_zeros
    assert text["pooled"][1].abs().sum() > 0  # a caption is never zeroed
    # the flag reaches the text cache's key and the pipelines the family builds
    other = family.load(build_config(_sdxl_run(tiny_sdxl, Path("."), Path("."), kind="lora")).model)
    assert (family.text_cache_identity(parts) == family.text_cache_identity(other)) is force_zeros
    assert family.pipeline(parts).config.force_zeros_for_empty_prompt is force_zeros


def test_lora_in_kohya_names_loads_like_the_diffusers_file(tiny_sdxl: Path, tiny_base: Path, circles: Path,
                                                          tmp_path: Path) -> None:
    raw = _sdxl_run(tiny_sdxl, circles, tmp_path / "run", kind="lora", train_text_encoder=True,
                    lora={"rank": 4, "alpha": 8.0, "init": "gaussian"})
    config = build_config(raw)
    final = train(config)
    (tmp_path / "card").mkdir()
    card = write_model_card(tmp_path / "run", config, tmp_path / "card").read_text()
    assert "license: openrail++" in card and "stable-diffusion-xl" in card
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "load_lora_weights" in card
    kohya = export_lora(tmp_path / "run", tmp_path / "kohya.safetensors")
    prefixes = {key.split("_", 2)[1] for key in load_file(kohya) if key.startswith("lora_")}
    assert prefixes == {"unet", "te1", "te2"}
    # the UNet by its original (SGM) module names, as sd-scripts names SDXL LoRA modules
    unet_keys = [key for key in load_file(kohya) if key.startswith("lora_unet_")]
    assert unet_keys and all(key.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                             "lora_unet_output_blocks_")) for key in unet_keys)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in unet_keys
    assert all(float(v) == 8.0 for k, v in load_file(kohya).items() if k.endswith(".alpha"))
    diffusers_format, kohya_format = _pipeline(tiny_sdxl), _pipeline(tiny_sdxl)
    base_image = _image(diffusers_format)
    diffusers_format.load_lora_weights(final)
    kohya_format.load_lora_weights(kohya)
    image = _image(diffusers_format)
    assert not np.allclose(image, base_image, atol=1e-4)
    assert np.abs(_image(kohya_format) - image).max() < 1e-5
    # an SDXL LoRA run on an SD base is named before anything loads
    done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--base", str(tiny_base), "--lora",
                           str(tmp_path / "run"), "--prompt", PROMPT, "--out", str(tmp_path / "o.png")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "trained on a 'sdxl' base" in done.stderr, done.stderr


def test_single_file_export_of_a_full_run_generates_the_same_image(tiny_sdxl: Path, circles: Path,
                                                                   tmp_path: Path) -> None:
    final = train(build_config(_sdxl_run(tiny_sdxl, circles, tmp_path / "run", kind="full")))
    out = tmp_path / "sdxl.safetensors"
    done = subprocess.run([sys.executable, "-m", "difftune", "export", "single-file", str(tmp_path / "run"),
                           str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    single = StableDiffusionXLPipeline.from_single_file(str(out), config=str(final), local_files_only=True,
                                                        add_watermarker=False)
    single.scheduler = UniPCMultistepScheduler.from_config(single.scheduler.config)
    single.set_progress_bar_config(disable=True)
    folder = _pipeline(final)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert np.abs(_image(single) - _image(folder)).max() < 1e-5


def test_an_sd_folder_given_as_sdxl_names_its_family(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    raw = _sdxl_run(tiny_base, circles, tmp_path / "run", kind="lora")
    with pytest.raises(UserError, match=r"is a Stable Diffusion 1.x and 2.x pipeline \(family 'sd'\), but "
                                        r"model.family is 'sdxl'"):
        plan_run(build_config(raw))
    assert not (tmp_path / "run").exists()


def test_generate_takes_an_sdxl_controlnet_run(tiny_sdxl: Path, circles: Path, held_out: Path,
                                               tmp_path: Path) -> None:
    raw = _sdxl_run(tiny_sdxl, circles, tmp_path / "run", kind="controlnet")
    train(build_config(raw))
    out = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--controlnet", str(tmp_path / "run"),
                           "--image", str(held_out / "conditioning_images" / "000000.png"), "--prompt", PROMPT,
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    # continued from that SDXL ControlNet; an SD ControlNet is named as made for another base
    raw = _sdxl_run(tiny_sdxl, circles, tmp_path / "more", kind="controlnet", controlnet=str(tmp_path / "run"))
    raw["train"]["max_steps"] = 1
    assert train(build_config(raw)) is not None


def test_a_controlnet_of_another_kind_of_base_is_named(tiny_sdxl: Path, tiny_base: Path, circles: Path,
                                                      tmp_path: Path) -> None:
    sd_run = run_config(tiny_base, circles, tmp_path / "sd", train={"max_steps": 1}, validation={"every": 100})
    train(build_config(sd_run))
    raw = _sdxl_run(tiny_sdxl, circles, tmp_path / "run", kind="controlnet", controlnet=str(tmp_path / "sd"))
    with pytest.raises(UserError, match="made for another kind of base.*cross_attention_dim"):
        plan_run(build_config(raw))
    done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--base", str(tiny_sdxl), "--controlnet",
                           str(tmp_path / "sd"), "--image", str(circles / "conditioning_images" / "000000.png"),
                           "--prompt", PROMPT, "--out", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert done.returncode == 2 and "made for another kind of base" in done.stderr


def test_a_base_of_another_family_or_an_unfit_part_is_named_before_models_load(tiny_sdxl: Path, circles: Path,
                                                                              tmp_path: Path) -> None:
    """Found from outside: each of these was a traceback after the models loaded."""
    import json
    import shutil

    from diffusers import AutoencoderKL

    raw = _sdxl_run(tiny_sdxl, circles, tmp_path / "run", kind="lora")
    raw["model"]["family"] = "sd"
    with pytest.raises(UserError, match="Stable Diffusion XL pipeline \\(family 'sdxl'\\), but model.family is 'sd'"):
        plan_run(build_config(raw))
    done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--base", str(tiny_sdxl), "--family", "sd",
                           "--prompt", PROMPT, "--out", str(tmp_path / "o.png")], capture_output=True, text=True)
    assert done.returncode == 2 and "family 'sdxl'" in done.stderr
    AutoencoderKL(block_out_channels=[4, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=8, norm_num_groups=2).save_pretrained(
        tmp_path / "vae8")
    raw = _sdxl_run(tiny_sdxl, circles, tmp_path / "run", kind="lora")
    raw["model"]["vae"] = str(tmp_path / "vae8")
    with pytest.raises(UserError, match="makes latents of 8 channels at 1/2 size; the base's VAE .* makes 4"):
        plan_run(build_config(raw))
    uneven = shutil.copytree(tiny_sdxl, tmp_path / "uneven")
    config = uneven / "tokenizer_2" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 20}))
    raw = _sdxl_run(uneven, circles, tmp_path / "run", kind="lora")
    with pytest.raises(UserError, match="tokenizers cut prompts at different lengths"):
        plan_run(build_config(raw))
    assert not (tmp_path / "run").exists()


def test_a_config_started_from_a_preset_trains_on_a_tiny_base(tiny_sdxl: Path, circles: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """`difftune presets` lists it, `difftune init sdxl/lora x.toml` copies it with its
    comments, and the copy trains once its Hub names are set to local folders."""
    from difftune.cli import main

    assert main(["presets"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("sdxl/lora ") and "LoRA on Stable Diffusion XL" in line for line in listed)
    config = tmp_path / "x.toml"
    assert main(["init", "sdxl/lora", str(config)]) == 0
    assert config.read_text().startswith("# LoRA on Stable Diffusion XL")
    assert main(["init", "sdxl/lora", str(config)]) == 2  # an existing file is kept
    assert main(["init", "sdxl/lorra", str(tmp_path / "y.toml")]) == 2
    assert "no preset 'sdxl/lorra'; there are: sdxl/controlnet" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "y.toml").exists()
    settings = {"model.pretrained": str(tiny_sdxl), "model.vae": str(tiny_sdxl / "vae"), "data.path": str(circles),
                "data.resolution": 64, "train.output_dir": str(tmp_path / "run"), "train.mixed_precision": "no",
                "train.max_steps": 2, "validation.num_images": 1, "validation.steps": 2}
    overrides = [f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}" for key, value in settings.items()]
    assert main(["train", str(config), *[part for o in overrides for part in ("--set", o)]]) == 0
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
