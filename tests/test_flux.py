"""Flux: the prompt, packing, position ids, time and guidance checked against diffusers'
own FluxPipeline; LoRA and full runs that FluxPipeline loads; another VAE shape; what
the config refuses for a flow-matching family."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, run_config
from diffusers import FluxPipeline
from PIL import Image

from difftune.config import ConfigError, build_config
from difftune.errors import UserError
from difftune.families import ModelInputs, get_family
from difftune.families.flux.family import image_ids, pack, unpack
from difftune.families.flux.tiny import build_tiny_flux
from difftune.training.loop import train
from difftune.training.plan import plan_run

PROMPT = "red circle with blue background"


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny-flux", WORDS, seed=0)


def _flux_run(base: Path, data: Path, out: Path, **method) -> dict:
    raw = run_config(base, data, out, train={"max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2},
                     validation={"every": 2, "steps": 2, "prompts": [PROMPT]})
    raw["model"]["family"] = "flux"
    raw["method"] = method
    return raw


def _pipeline(base: Path) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe: FluxPipeline) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


def test_prompt_latents_and_transformer_call_are_what_the_pipeline_uses(tiny_flux: Path) -> None:
    family = get_family("flux")
    parts = family.load(build_config(_flux_run(tiny_flux, Path("."), Path("."), kind="lora")).model)
    pipe = _pipeline(tiny_flux)
    text = family.encode_prompts(parts, [PROMPT, ""])
    embeds, pooled, text_ids = pipe.encode_prompt([PROMPT, ""], prompt_2=None)
    assert torch.equal(text["hidden_states"], embeds) and torch.equal(text["pooled"], pooled)
    latents = torch.randn(2, 1, 8, 6, generator=torch.Generator().manual_seed(0))
    packed = pipe._pack_latents(latents, 2, 1, 8, 6)
    assert torch.equal(pack(latents), packed) and torch.equal(unpack(packed, 1, 8, 6), latents)
    assert torch.equal(image_ids(4, 3, torch.device("cpu"), torch.float32),
                       pipe._prepare_latent_image_ids(2, 4, 3, torch.device("cpu"), torch.float32))
    timesteps = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        ours = family.predict(parts, ModelInputs(latents, timesteps, text))
        theirs = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.full((2,), 3.5),
                                  pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                  img_ids=pipe._prepare_latent_image_ids(2, 4, 3, torch.device("cpu"), torch.float32),
                                  return_dict=False)[0]
    assert torch.equal(ours, unpack(theirs, 1, 8, 6))


def test_the_time_shift_grows_with_the_image_as_the_pipeline_shifts(tiny_flux: Path) -> None:
    """The objective's mu for a token count is FluxPipeline's calculate_shift."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    family = get_family("flux")
    parts = family.load(build_config(_flux_run(tiny_flux, Path("."), Path("."), kind="lora")).model)
    config = parts.noise_scheduler.config
    mu = family.shift_mu(parts)
    for tokens in (16, 256, 1024, 4096):
        assert mu(tokens) == pytest.approx(calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                                                           config.base_shift, config.max_shift))


@pytest.mark.parametrize("size", ["test", "test-x2"])
def test_a_lora_run_loads_into_fluxpipeline_and_changes_it(size: str, circles: Path, tmp_path: Path) -> None:
    """Also on a base whose VAE halves the image and has two latent channels."""
    base = build_tiny_flux(tmp_path / "base", WORDS, size=size, seed=0)
    raw = _flux_run(base, circles, tmp_path / "run", kind="lora", train_text_encoder=True)
    final = train(build_config(raw))
    assert (tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png").is_file()
    pipe = _pipeline(base)
    before = _image(pipe)
    pipe.load_lora_weights(final)
    after = _image(pipe)
    assert not np.allclose(before, after, atol=1e-4), "the LoRA changed nothing"
    assert any("lora" in type(m).__module__ for m in pipe.text_encoder.modules())  # CLIP adapted, as asked
    if size == "test":  # the CLI renders with the run's LoRA on its base, at a LoRA scale
        out = tmp_path / "out.png"
        done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--lora", str(tmp_path / "run"),
                               "--prompt", PROMPT, "--steps", "2", "--lora-scale", "0.5", "--out", str(out)],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert Image.open(out).size == (64, 64)


def test_a_full_run_saves_a_pipeline_flux_loads(tiny_flux: Path, circles: Path, tmp_path: Path) -> None:
    raw = _flux_run(tiny_flux, circles, tmp_path / "run", kind="full")
    raw["data"] |= {"cache_text": True, "cache_latents": True}
    raw["objective"] = {"timestep_sampling": "logit_normal", "loss_weighting": "cosmap"}
    final = train(build_config(raw))
    pipe = _pipeline(final)
    trained = pipe.transformer.state_dict()
    base = _pipeline(tiny_flux).transformer.state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert np.isfinite(_image(pipe)).all()


def test_the_config_refuses_what_flux_cannot_do(tiny_flux: Path, tiny_base: Path, circles: Path) -> None:
    raw = _flux_run(tiny_base, circles, Path("out"), kind="control")
    raw["model"]["family"] = "sd"  # channel-concat Control is for the transformer families
    with pytest.raises(ConfigError, match="method.kind = 'control': family 'sd'"):
        build_config(raw)
    raw = _flux_run(tiny_flux, circles, Path("out"), kind="lora")
    raw["objective"] = {"snr_gamma": 5.0}
    with pytest.raises(ConfigError, match="objective.snr_gamma: family 'flux' trains with flow_matching"):
        build_config(raw)


def test_a_size_that_makes_no_whole_patches_is_named_before_models_load(tiny_flux: Path, circles: Path,
                                                                        tmp_path: Path) -> None:
    """With FLUX.1's VAE factor 8, sides must be multiples of 16; 72 is one of 8 only."""
    import json
    import shutil

    base = shutil.copytree(tiny_flux, tmp_path / "x8")
    vae = base / "vae" / "config.json"
    vae.write_text(json.dumps({**json.loads(vae.read_text()), "block_out_channels": [4, 4, 4, 4]}))
    raw = _flux_run(base, circles, tmp_path / "run", kind="lora")
    raw["data"]["resolution"] = 72
    with pytest.raises(UserError, match=r"data.resolution = 72 must be a multiple of 16 \(the VAE factor 8 x the 2x2"):
        plan_run(build_config(raw))
    raw["data"] |= {"resolution": 64, "buckets": True, "bucket_step": 8}
    with pytest.raises(UserError, match="data.bucket_step = 8 must be a multiple of 16"):
        plan_run(build_config(raw))


def test_control_at_step_zero_is_the_base_exactly(tiny_flux: Path, circles: Path) -> None:
    """The widened projection's new inputs start at zero: any control latents, same output."""
    from difftune.methods import make_method

    family = get_family("flux")
    config = build_config(_control_run(tiny_flux, circles, Path(".")))
    parts = family.load(config.model)
    text = family.encode_prompts(parts, [PROMPT, ""])
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = ModelInputs(latents, torch.tensor([250.0, 900.0]), text)
    with torch.no_grad():
        before = family.predict(parts, inputs)
        trained = make_method(config.method).build(family, parts)
        control = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
        after = family.predict(parts, ModelInputs(torch.cat([latents, control], 1), inputs.timesteps, text))
    assert parts.denoiser.config.in_channels == 8 and parts.denoiser.config.out_channels == 4
    assert parts.denoiser.x_embedder.in_features == 8 and after.shape == before.shape
    assert torch.equal(before, after)
    assert all(p.requires_grad for p in trained["transformer"].parameters())


def _control_run(base: Path, data: Path, out: Path, **method) -> dict:
    raw = _flux_run(base, data, out, kind="control", **method)
    raw["validation"] = {"every": 2, "steps": 2, "num_images": 1, "prompts": [PROMPT],
                         "images": [str(data / "conditioning_images" / "000000.png")]}
    return raw


def test_a_control_run_saves_a_fluxcontrolpipeline(tiny_flux: Path, circles: Path, tmp_path: Path) -> None:
    from diffusers import FluxControlPipeline

    final = train(build_config(_control_run(tiny_flux, circles, tmp_path / "run")))
    assert (tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png").is_file()
    pipe = FluxControlPipeline.from_pretrained(final)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.in_channels == 8
    out = tmp_path / "out.png"  # the CLI takes the run as --base, with its control image
    command = [sys.executable, "-m", "difftune", "generate", "--base", str(tmp_path / "run"), "--prompt", PROMPT,
               "--steps", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "a Control model needs --image" in done.stderr
    done = subprocess.run([*command, "--image", str(circles / "conditioning_images" / "000000.png")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (64, 64)
    control = Image.open(circles / "conditioning_images" / "000000.png").convert("RGB")
    image = pipe(PROMPT, control_image=control, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.isfinite(image).all()


def test_a_control_lora_loads_into_the_base_control_pipeline(tiny_flux: Path, circles: Path,
                                                             tmp_path: Path) -> None:
    """Control-LoRA: adapters on the attention and the widened projection; diffusers widens
    the base's projection when it loads the file, and the adapters steer the output."""
    from diffusers import FluxControlPipeline

    final = train(build_config(_control_run(tiny_flux, circles, tmp_path / "run", lora={"rank": 4})))
    pipe = FluxControlPipeline.from_pretrained(tiny_flux)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(final)
    assert pipe.transformer.config.in_channels == 8
    control = Image.open(circles / "conditioning_images" / "000000.png").convert("RGB")

    def image(scale: float) -> np.ndarray:
        return pipe(PROMPT, control_image=control, num_inference_steps=2, height=32, width=32, output_type="np",
                    joint_attention_kwargs={"scale": scale}, generator=torch.Generator().manual_seed(0)).images[0]

    assert not np.allclose(image(0.0), image(1.0), atol=1e-4)
    out = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--lora", str(tmp_path / "run"),
                           "--image", str(circles / "conditioning_images" / "000000.png"), "--prompt", PROMPT,
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_fresh_flux_controlnet_changes_nothing_until_it_trains(tiny_flux: Path, circles: Path) -> None:
    family = get_family("flux")
    raw = _control_run(tiny_flux, circles, Path("."))
    raw["method"] = {"kind": "controlnet", "controlnet_double_blocks": 1, "controlnet_single_blocks": 0}
    config = build_config(raw)
    parts = family.load(config.model)
    controlnet = family.make_controlnet(parts, None, config.method)
    assert (controlnet.config.num_layers, controlnet.config.num_single_layers) == (1, 0)
    text = family.encode_prompts(parts, [PROMPT, ""])
    inputs = ModelInputs(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                         torch.tensor([250.0, 900.0]), text)
    conditioning = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = family.predict(parts, inputs)
        residuals = family.controlnet_residuals(parts, controlnet, inputs, conditioning)
        assert residuals["controlnet_block_samples"] and residuals["controlnet_single_block_samples"] is None
        assert torch.equal(plain, family.predict(parts, inputs.with_extra(**residuals)))


def test_a_flux_controlnet_run_generates_and_continues(tiny_flux: Path, circles: Path, held_out: Path,
                                                       tmp_path: Path) -> None:
    raw = _control_run(tiny_flux, circles, tmp_path / "run")
    raw["method"] = {"kind": "controlnet", "controlnet_single_blocks": 1}
    train(build_config(raw))
    out = tmp_path / "out.png"
    done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--controlnet", str(tmp_path / "run"),
                           "--image", str(held_out / "conditioning_images" / "000000.png"), "--prompt", PROMPT,
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (64, 64)
    raw = _control_run(tiny_flux, circles, tmp_path / "more")
    raw["method"] = {"kind": "controlnet", "controlnet": str(tmp_path / "run")}
    raw["train"]["max_steps"] = 1
    assert train(build_config(raw)) is not None


def test_block_counts_are_refused_where_a_controlnet_copies_the_whole_encoder(tiny_base: Path,
                                                                               circles: Path) -> None:
    raw = run_config(tiny_base, circles, Path("out"))
    raw["method"]["controlnet_double_blocks"] = 2
    with pytest.raises(ConfigError, match="method.controlnet_double_blocks: family 'sd' copies its whole encoder"):
        build_config(raw)


@pytest.mark.parametrize("lora", [None, {"rank": 4}], ids=["full", "lora"])
def test_a_resumed_control_run_ends_with_the_same_weights(lora: dict | None, tiny_flux: Path, circles: Path,
                                                          tmp_path: Path) -> None:
    """The widened projection is rebuilt before the checkpoint loads into it."""
    from safetensors.torch import load_file

    from difftune.training.loop import Run

    def config(out: Path, steps: int) -> dict:
        raw = _control_run(tiny_flux, circles, out, **({"lora": lora} if lora else {}))
        raw["train"] |= {"batch_size": 4, "checkpoint_every": 2, "max_steps": steps}
        raw["validation"]["every"] = 100
        return raw

    train(build_config(config(tmp_path / "a", 4)))
    train(build_config(config(tmp_path / "b", 2)))
    resumed = Run(build_config(config(tmp_path / "b", 4)))
    assert resumed.resume_from == tmp_path / "b" / "checkpoints" / "step-000002"
    resumed.fit()
    name = "pytorch_lora_weights.safetensors" if lora else "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path / "a" / "final" / name), load_file(tmp_path / "b" / "final" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_short_t5_length_reaches_every_pipeline_call(circles: Path, tmp_path: Path) -> None:
    """A base whose T5 tokenizer stops at 16 tokens trains at 16, and generation is told
    so (FluxPipeline pads to 512 by default, which the transformer would attend to)."""
    base = build_tiny_flux(tmp_path / "short", WORDS, seed=0, t5_length=16)
    family = get_family("flux")
    parts = family.load(build_config(_flux_run(base, circles, tmp_path / "run", kind="lora")).model)
    assert family.encode_prompts(parts, [PROMPT])["hidden_states"].shape[1] == 16
    pipe = _pipeline(base)
    assert family.generation_options(pipe) == {"max_sequence_length": 16}
    train(build_config(_flux_run(base, circles, tmp_path / "run", kind="full")))
    assert (tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png").is_file()


def test_a_control_run_from_the_latent_cache_trains_as_one_without(tiny_flux: Path, circles: Path,
                                                                   tmp_path: Path) -> None:
    """The cache holds the control image's latents (both flip sides); the weights come out
    as from encoding every step."""
    from safetensors.torch import load_file

    from difftune.training.events import read_events

    finals = {}
    for cached in (False, True):
        raw = _control_run(tiny_flux, circles, tmp_path / f"run-{cached}")
        raw["data"] |= {"cache_latents": cached, "random_flip": True,
                        "encoded_cache_dir": str(tmp_path / "cache")}
        raw["validation"]["every"] = 100
        finals[cached] = load_file(train(build_config(raw)) / "transformer" / "diffusion_pytorch_model.safetensors")
    caches = [e for e in read_events(tmp_path / "run-True") if e["event"] == "cache"]
    assert caches and caches[0]["latents_encoded"] == 12
    from safetensors import safe_open

    names = {name for shard in (tmp_path / "cache").rglob("*.safetensors") for name in safe_open(shard, "pt").keys()}
    assert sum(name.endswith("_conditioning_mean") for name in names) == 24  # 12 entries, both flip sides
    assert all(torch.allclose(finals[False][k], finals[True][k], atol=1e-5) for k in finals[False])
