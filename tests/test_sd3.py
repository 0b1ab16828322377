"""SD3 / SD3.5: the prompt, the latents, the time shift, the transformer call and the
ControlNet's inputs checked against diffusers' own StableDiffusion3Pipeline and
StableDiffusion3ControlNetPipeline on a pipeline built here from diffusers' and
transformers' classes; LoRA, full, DreamBooth-LoRA and ControlNet runs whose results
those pipelines load and render."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, run_config
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from difftune.config import ConfigError, build_config
from difftune.errors import UserError
from difftune.families import ModelInputs, get_family
from difftune.families.base import Parts
from difftune.families.sd3.tiny import build_tiny_sd3
from difftune.tiny import write_t5_tokenizer, write_word_tokenizer
from difftune.training.loop import train
from difftune.training.plan import plan_run

PROMPT = "red circle with blue background"


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3", WORDS, seed=0)


@pytest.fixture(scope="module")
def other_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another SD3 shape, built here rather than by the family's builder: a VAE of factor 4
    with 5 latent channels, a transformer of patch 1, the first CLIP tokenizer shorter than
    the second (the pipeline cuts both at the first's length), a T5 tokenizer longer than
    the pipeline's 256 tokens (cut there), CLIP-L 8 + CLIP-G 12 wide (padded to T5's 28),
    pooled widths 6 + 10, and a static shift of 2.5."""
    out = tmp_path_factory.mktemp("sd3-other")
    tokenizer = write_word_tokenizer(out / "scratch" / "clip", WORDS, max_length=20)
    tokenizer_2 = write_word_tokenizer(out / "scratch" / "clip2", WORDS, max_length=77)
    tokenizer_3 = write_t5_tokenizer(out / "scratch" / "t5", WORDS, max_length=300)
    torch.manual_seed(1)

    def clip(width: int, projection: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=projection, bos_token_id=0,
            eos_token_id=1, pad_token_id=1))

    vae = AutoencoderKL(block_out_channels=[4, 4, 8], down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=5, norm_num_groups=2,
                        layers_per_block=1, shift_factor=0.25, scaling_factor=0.7)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=5, out_channels=5, num_layers=2,
                                        attention_head_dim=4, num_attention_heads=3, joint_attention_dim=28,
                                        caption_projection_dim=12, pooled_projection_dim=16, pos_embed_max_size=16)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=28, d_kv=4, d_ff=19, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=4, pad_token_id=0, eos_token_id=1))
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=2.5), vae=vae,
        text_encoder=clip(8, 6), tokenizer=tokenizer, text_encoder_2=clip(12, 10), tokenizer_2=tokenizer_2,
        text_encoder_3=t5, tokenizer_3=tokenizer_3,
    ).save_pretrained(out / "base")
    return out / "base"


def _sd3_run(base: Path, data: Path, out: Path, **method: object) -> dict:
    raw = run_config(base, data, out, train={"max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2},
                     validation={"every": 2, "steps": 2, "prompts": [PROMPT]})
    raw["model"]["family"] = "sd3"
    raw["method"] = method
    if method.get("kind") == "controlnet":
        raw["validation"] |= {"images": [str(data / "conditioning_images" / "000000.png")], "num_images": 1}
    return raw


def _parts(base: Path) -> Parts:
    return get_family("sd3").load(build_config(_sd3_run(base, Path("."), Path("."), kind="lora")).model)


def _pipeline(cls: type, base: Path, **parts: object):
    pipe = cls.from_pretrained(base, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe, **call: object) -> np.ndarray:
    length = get_family("sd3").generation_options(pipe)
    return pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **length, **call).images[0]


# --- what the family computes, against the pipeline ---------------------------------------


def test_prompt_latents_time_and_transformer_call_are_what_the_pipeline_uses(other_sd3: Path) -> None:
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import retrieve_latents

    from difftune.objectives import FlowMatching

    family = get_family("sd3")
    parts = _parts(other_sd3)
    pipe = _pipeline(StableDiffusion3Pipeline, other_sd3)
    assert family.generation_options(pipe) == {"max_sequence_length": 256}  # the T5 tokenizer's 300, cut
    captions = [PROMPT, "", "green circle with " * 12]  # the last one longer than the first CLIP's 20 tokens
    text = family.encode_prompts(parts, captions)
    embeds, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                              max_sequence_length=256)
    assert text["hidden_states"].shape == (3, 20 + 256, 28) and text["pooled"].shape == (3, 16)
    assert torch.equal(text["hidden_states"], embeds) and torch.equal(text["pooled"], pooled)

    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    seeds = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ours = family.encode_images(parts, pixels, seeds)
    seeds = [torch.Generator().manual_seed(s) for s in (3, 4)]
    theirs = torch.cat([retrieve_latents(pipe.vae.encode(pixels[i : i + 1]), generator=g) for i, g in enumerate(seeds)])
    vae = pipe.vae.config
    assert ours.shape == (2, 5, 4, 4) and family.vae_scale_factor(parts) == 4
    assert torch.allclose(ours, (theirs - vae.shift_factor) * vae.scaling_factor, atol=1e-6)
    assert family.latent_patch_of(str(other_sd3))[0] == 1

    objective = family.objective(parts, build_config(_sd3_run(other_sd3, Path("."), Path("."), kind="lora")).objective)
    assert isinstance(objective, FlowMatching)
    scheduler = pipe.scheduler  # its sigmas at construction: the 1000 training times, shifted by its config's 2.5
    unshifted = torch.linspace(1, 1000, 1000).flip(0) / 1000
    assert torch.allclose(objective.shift(unshifted, 4, 4), scheduler.sigmas, atol=1e-6)

    latents = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([250.0, 900.0, 31.5])
    with torch.no_grad():
        ours = family.predict(parts, ModelInputs(latents, timesteps, text))
        theirs = pipe.transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds,
                                  pooled_projections=pooled, return_dict=False)[0]
    assert torch.equal(ours, theirs)


def _randomised(net: SD3ControlNetModel) -> SD3ControlNetModel:
    """A ControlNet as if trained: its zero-initialised input and outputs made random."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (net.pos_embed_input, *net.controlnet_blocks):
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return net


@pytest.mark.parametrize("instantx", [False, True], ids=["difftune", "instantx"])
def test_the_controlnet_sees_what_the_controlnet_pipeline_gives_it(instantx: bool, tiny_sd3: Path, circles: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """One step of StableDiffusion3ControlNetPipeline, its ControlNet's inputs and outputs
    caught, and the family's residuals for the same noisy latents, time and control image:
    equal. A new ControlNet (pooled prompt, shifted control latents) and one whose config
    forces zeros for the pooled projection as InstantX's do (zeros, unshifted latents)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    family = get_family("sd3")
    raw = _sd3_run(tiny_sd3, circles, Path("."), kind="controlnet", controlnet_double_blocks=1)
    config = build_config(raw)
    parts = family.load(config.model)
    net = _randomised(family.make_controlnet(parts, None, config.method))
    assert parts.denoiser.config.num_layers == 2 and "extra_conditioning_channels" not in parts.denoiser.config
    assert (net.config.num_layers, net.config.extra_conditioning_channels) == (1, 0)
    assert net.config.force_zeros_for_pooled_projection is False
    net.register_to_config(force_zeros_for_pooled_projection=instantx)
    pipe = family.pipeline(parts.with_modules({"controlnet": net}))
    assert isinstance(pipe, StableDiffusion3ControlNetPipeline)
    seen = {}

    def catch(module: object, args: tuple, kwargs: dict, output: tuple) -> None:
        seen.update(kwargs, output=output[0])

    net.register_forward_hook(catch, with_kwargs=True)
    control = Image.open(circles / "conditioning_images" / "000000.png").convert("RGB")
    with torch.no_grad():
        pipe(PROMPT, control_image=control, num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
             generator=torch.Generator().manual_seed(0), output_type="latent", **family.generation_options(pipe))
        text = family.encode_prompts(parts, [PROMPT])
        inputs = ModelInputs(seen["hidden_states"], seen["timestep"], text)
        pixels = torch.from_numpy(np.asarray(control, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        ours = family.controlnet_residuals(parts, net, inputs, pixels)["block_controlnet_hidden_states"]
    assert torch.equal(seen["pooled_projections"], torch.zeros_like(text["pooled"]) if instantx else text["pooled"])
    assert len(ours) == 1 and torch.allclose(ours[0], seen["output"][0], atol=1e-5)
    assert ours[0].abs().max() > 1e-3


def test_a_fresh_controlnet_changes_nothing_until_it_trains(tiny_sd3: Path, circles: Path) -> None:
    family = get_family("sd3")
    config = build_config(_sd3_run(tiny_sd3, circles, Path("."), kind="controlnet"))
    parts = family.load(config.model)
    net = family.make_controlnet(parts, None, config.method)  # the default 4 blocks: all the base's 2 but the last
    assert net.config.num_layers == 1
    text = family.encode_prompts(parts, [PROMPT, ""])
    inputs = ModelInputs(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
                         torch.tensor([250.0, 900.0]), text)
    with torch.no_grad():
        plain = family.predict(parts, inputs)
        residuals = family.controlnet_residuals(parts, net, inputs, torch.rand(2, 3, 16, 16))
        assert torch.equal(plain, family.predict(parts, inputs.with_extra(**residuals)))


# --- runs whose results diffusers loads -----------------------------------------------------


def test_a_lora_run_loads_into_the_pipeline_and_changes_it(tiny_sd3: Path, circles: Path, tmp_path: Path) -> None:
    final = train(build_config(_sd3_run(tiny_sd3, circles, tmp_path / "run", kind="lora", train_text_encoder=True)))
    assert (tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png").is_file()
    pipe = _pipeline(StableDiffusion3Pipeline, tiny_sd3)
    before = _image(pipe)
    pipe.load_lora_weights(final)
    assert not np.allclose(before, _image(pipe), atol=1e-4), "the LoRA changed nothing"
    for name in ("text_encoder", "text_encoder_2"):  # both CLIPs adapted, as asked; never T5
        assert any("lora" in type(m).__module__ for m in getattr(pipe, name).modules()), name
    assert not any("lora" in type(m).__module__ for m in pipe.text_encoder_3.modules())
    assert np.allclose(before, _image(pipe, joint_attention_kwargs={"scale": 0.0}), atol=1e-5)


def test_a_dreambooth_lora_run_loads_into_the_pipeline(tiny_sd3: Path, circles: Path, tmp_path: Path) -> None:
    raw = _sd3_run(tiny_sd3, circles, tmp_path / "run", kind="dreambooth", lora={"rank": 4},
                   dreambooth={"instance_prompt": PROMPT})
    final = train(build_config(raw))
    pipe = _pipeline(StableDiffusion3Pipeline, tiny_sd3)
    before = _image(pipe)
    pipe.load_lora_weights(final)
    assert not np.allclose(before, _image(pipe), atol=1e-4), "the LoRA changed nothing"


def test_a_full_run_saves_a_pipeline_that_loads(tiny_sd3: Path, circles: Path, tmp_path: Path) -> None:
    raw = _sd3_run(tiny_sd3, circles, tmp_path / "run", kind="full")
    raw["data"] |= {"cache_text": True, "cache_latents": True}
    raw["objective"] = {"timestep_sampling": "logit_normal"}
    final = train(build_config(raw))
    pipe = _pipeline(StableDiffusion3Pipeline, final)
    trained, base = pipe.transformer.state_dict(), SD3Transformer2DModel.from_pretrained(
        tiny_sd3, subfolder="transformer").state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert np.isfinite(_image(pipe)).all()


def test_a_controlnet_run_loads_into_the_controlnet_pipeline(tiny_sd3: Path, circles: Path, held_out: Path,
                                                             tmp_path: Path) -> None:
    raw = _sd3_run(tiny_sd3, circles, tmp_path / "run", kind="controlnet", controlnet_double_blocks=1)
    final = train(build_config(raw))
    assert (tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png").is_file()
    net = SD3ControlNetModel.from_pretrained(final)
    assert net.config.num_layers == 1 and net.config.force_zeros_for_pooled_projection is False
    pipe = _pipeline(StableDiffusion3ControlNetPipeline, tiny_sd3, controlnet=net)
    control = Image.open(held_out / "conditioning_images" / "000000.png").convert("RGB")
    assert np.isfinite(_image(pipe, control_image=control)).all()
    out = tmp_path / "out.png"  # the CLI: the run's ControlNet on its base
    done = subprocess.run([sys.executable, "-m", "difftune", "generate", "--controlnet", str(tmp_path / "run"),
                           "--image", str(held_out / "conditioning_images" / "000000.png"), "--prompt", PROMPT,
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (64, 64)


# --- what the config refuses ------------------------------------------------------------------


def test_what_sd3_cannot_do_is_refused_before_it_loads(tiny_sd3: Path, circles: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="method.kind = 'control': family 'sd3'"):
        build_config(_sd3_run(tiny_sd3, circles, Path("out"), kind="control"))
    with pytest.raises(ConfigError, match="objective.snr_gamma: family 'sd3' trains with flow_matching"):
        build_config(_sd3_run(tiny_sd3, circles, Path("out"), kind="lora") | {"objective": {"snr_gamma": 5.0}})
    for method, message in (({"controlnet_single_blocks": 1}, "an SD3 transformer has joint blocks only"),
                            ({"controlnet_double_blocks": 2}, "the base's transformer has 2 joint blocks.*copies at most 1"),
                            ({"controlnet_double_blocks": 0, "controlnet_single_blocks": 1}, "copy at least one")):
        with pytest.raises(UserError, match=message):
            plan_run(build_config(_sd3_run(tiny_sd3, circles, Path("out"), kind="controlnet", **method)))
    import json
    import shutil

    base = shutil.copytree(tiny_sd3, tmp_path / "x8")  # SD3's VAE factor 8: with 2x2 patches, sides of 16
    vae = base / "vae" / "config.json"
    vae.write_text(json.dumps({**json.loads(vae.read_text()), "block_out_channels": [4, 4, 4, 4]}))
    raw = _sd3_run(base, circles, Path("out"), kind="lora")
    raw["data"]["resolution"] = 72
    with pytest.raises(UserError, match=r"data.resolution = 72 must be a multiple of 16 \(the VAE factor 8 x the "
                                        r"transformer's 2x2 patches"):
        plan_run(build_config(raw))


def test_the_presets_are_the_methods_they_are_named_after() -> None:
    from difftune.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    presets = {name: load_config(root / "sd3" / f"{name}.toml") for name in ("lora", "controlnet", "full")}
    assert all(c.model.family == "sd3" and c.train.mixed_precision == "bf16" for c in presets.values())
    assert presets["lora"].method.kind == "lora" and presets["lora"].objective.timestep_sampling == "logit_normal"
    assert presets["controlnet"].method.kind == "controlnet"
    assert presets["controlnet"].method.controlnet_double_blocks == 12
    assert presets["full"].method.kind == "full" and not presets["full"].method.uses_lora
    demo = load_config(root / "demo" / "fill_circles_controlnet_sd3.toml")
    assert demo.model.family == "sd3" and demo.method.kind == "controlnet"
