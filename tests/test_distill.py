"""kind = "distill" (LCM-LoRA): one step's loss against a hand computation from diffusers'
own pieces; a 2-step run on the tiny SD and SDXL bases whose final/ loads with
load_lora_weights and samples with LCMScheduler in 4 steps at guidance 1; validation and
generate sample that way; a resumed run equals an unbroken one; bad settings refused
before any model loads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import WORDS, pipeline_calls, run_config
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from safetensors.torch import load_file

from difftune.cli import main
from difftune.config import ConfigError, build_config, load_config
from difftune.families import get_family
from difftune.families.base import ModelInputs
from difftune.export.lora import export_lora
from difftune.families.sdxl.tiny import build_tiny_sdxl
from difftune.methods import make_method
from difftune.methods.base import CleanInputs
from difftune.methods.distill.method import Draws
from difftune.methods.distill.spec import LCM_TARGETS
from difftune.rundir import read_events
from difftune.training.loop import Run, train

PROMPT = "red circle with blue background"
ROOT = Path(__file__).resolve().parents[1]
SD_OPTIONS = {"safety_checker": None, "requires_safety_checker": False}


def _method(**distill: Any) -> dict[str, Any]:
    return {"kind": "distill", "distill": {"kind": "lcm", **distill}, "lora": {"rank": 4}}


def _raw(base: Path, data: Path, out: Path, family: str = "sd", validate: bool = True, **method: Any) -> dict:
    raw = run_config(base, data, out, train={"max_steps": 2, "checkpoint_every": 2},
                     validation={"every": 2 if validate else 100, "prompts": [PROMPT], "num_images": 1})
    raw["model"]["family"] = family
    raw["method"] = method or _method()
    raw["validation"].pop("steps")  # the method's own (4)
    return raw


def _lcm_image(pipe: Any) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images[0]


# --- (1) the loss, by hand from diffusers' pieces ---------------------------------------------------

@pytest.mark.parametrize("loss", ["huber", "l2"])
def test_one_step_loss_equals_a_hand_computation_from_diffusers_pieces(tiny_base: Path, circles: Path,
                                                                       loss: str) -> None:
    """Student, guided teacher (the base without adapters), one DDIM step and the EMA-free
    target, computed independently: DDPMScheduler.add_noise and alphas_cumprod, a separate
    UNet without adapters as the teacher, the pipeline's own "" encoding, DDIMScheduler.step
    for the solver and LCMScheduler's boundary scalings."""
    config = build_config(_raw(tiny_base, circles, Path("out"), **_method(loss=loss, w_min=2.0, w_max=9.0)))
    family, method = get_family("sd"), make_method(config.method)
    parts = family.load(config.model)
    trained = method.build(family, parts)
    student = trained["unet"]
    torch.manual_seed(1)
    with torch.no_grad():  # adapters that change something (lora_B starts at zero)
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    latents = torch.randn(2, 4, 16, 16)
    noise = torch.randn(2, 4, 16, 16)
    index, w = torch.tensor([0, 7]), torch.tensor([2.5, 8.0])  # index 0: t_n clamps at 0
    text = family.encode_prompts(parts, ["red circle", "blue circle with red background"])
    ours = method.distill_loss(family, parts, CleanInputs(latents, text, None, []), Draws(index, noise, w))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, **SD_OPTIONS)  # its own UNet: no adapters
    ddpm = DDPMScheduler.from_pretrained(tiny_base, subfolder="scheduler")
    lcm = LCMScheduler.from_config(ddpm.config, timestep_scaling=10.0)
    ddim = DDIMScheduler.from_config(ddpm.config, set_alpha_to_one=False, clip_sample=False, thresholding=False)
    ddim.set_timesteps(50)
    k = ddpm.config.num_train_timesteps // 50
    start = (torch.arange(1, 51) * k - 1)[index]
    end = (start - k).clamp_min(0)
    assert start.tolist() == [19, 159] and end.tolist() == [0, 139]
    cond, uncond = pipe.encode_prompt(["red circle", "blue circle with red background"], "cpu", 1, True)
    noisy = ddpm.add_noise(latents, noise, start)
    a = ddpm.alphas_cumprod

    def x0(eps: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (z - (1 - a[t]).sqrt().view(-1, 1, 1, 1) * eps) / a[t].sqrt().view(-1, 1, 1, 1)

    def boundary(z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in range(len(t)):
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t[i])
            rows.append(c_skip * z[i] + c_out * x0(eps[i:i + 1], z[i:i + 1], t[i:i + 1])[0])
        return torch.stack(rows)

    with torch.no_grad():
        prediction = boundary(noisy, start, student(noisy, start, cond).sample)
        eps_cond, eps_uncond = pipe.unet(noisy, start, cond).sample, pipe.unet(noisy, start, uncond).sample
        guided = eps_cond + w.view(-1, 1, 1, 1) * (eps_cond - eps_uncond)  # cond + w (cond - uncond)
        x_prev = torch.stack([ddim.step(guided[i], int(start[i]), noisy[i]).prev_sample for i in range(2)])
        target = boundary(x_prev, end, student(x_prev, end, cond).sample)
    d = prediction - target
    expected = (torch.sqrt(d**2 + 0.001**2) - 0.001).mean() if loss == "huber" else (d**2).mean()
    assert torch.isfinite(expected) and float(expected) > 0
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-7)
    # the student's output has a gradient only into the adapters; the teacher left them on
    ours.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in student.named_parameters())
    assert all(p.requires_grad for n, p in student.named_parameters() if "lora_" in n)


def test_teacher_substeps_are_evenly_spaced_guided_ddim_steps(tiny_base: Path, circles: Path) -> None:
    """teacher_substeps = 2 on the grid of 50 (k = 20): the teacher goes from t_{n+k} to t_n
    in two guided DDIM steps of 10, as diffusers' DDIMScheduler at 100 steps takes them, with
    a separate UNet without adapters as the teacher."""
    config = build_config(_raw(tiny_base, circles, Path("out"), **_method(teacher_substeps=2)))
    family, method = get_family("sd"), make_method(config.method)
    parts = family.load(config.model)
    method.build(family, parts)
    prompts = ["red circle", "blue circle with red background"]
    start, end, w = torch.tensor([79, 159]), torch.tensor([59, 139]), torch.tensor([2.5, 8.0])
    noisy = torch.randn(2, 4, 16, 16)
    text = family.encode_prompts(parts, prompts)
    with torch.no_grad():
        ours = method.teacher_step(family, parts, ModelInputs(noisy, start, text), w, end, "epsilon")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, **SD_OPTIONS)
    ddim = DDIMScheduler.from_pretrained(tiny_base, subfolder="scheduler", set_alpha_to_one=False,
                                         clip_sample=False, thresholding=False)
    ddim.set_timesteps(100)  # steps of 10
    cond, uncond = pipe.encode_prompt(prompts, "cpu", 1, True)
    expected = noisy
    with torch.no_grad():
        for offset in (0, 10):
            t = start - offset
            eps_cond, eps_uncond = pipe.unet(expected, t, cond).sample, pipe.unet(expected, t, uncond).sample
            guided = eps_cond + w.view(-1, 1, 1, 1) * (eps_cond - eps_uncond)
            expected = torch.stack([ddim.step(guided[i], int(t[i]), expected[i]).prev_sample for i in range(2)])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("start_from_noise", "prediction_type"), [(True, "epsilon"), (False, "v_prediction")])
def test_trajectory_targets_are_the_end_of_one_guided_ddim_chain_per_group(tiny_base: Path, circles: Path,
                                                                          start_from_noise: bool,
                                                                          prediction_type: str) -> None:
    """target = "trajectory" on a grid of 4 (k = 250) with 6 samples: two groups (samples
    0-3 and 4-5), each a chain from its first sample (its noise at t = 999, or its latents
    noised there, its caption and guidance) down 999, 749, 499, 249 to 0 by diffusers'
    DDIMScheduler with the guided teacher (a separate UNet without adapters); sample i
    takes the chain's point i % 4, its target the chain's end. The UNet's output read as
    epsilon, or as v where the base's scheduler says v_prediction (SD 2.x)."""
    config = build_config(_raw(tiny_base, circles, Path("out"), **_method(
        num_ddim_timesteps=4, target="trajectory", start_from_noise=start_from_noise)))
    family, method = get_family("sd"), make_method(config.method)
    parts = family.load(config.model)
    parts.noise_scheduler.register_to_config(prediction_type=prediction_type)
    student = method.build(family, parts)["unet"]
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    prompts = ["red circle", "x", "x", "x", "blue circle with red background", "x"]
    latents, noise = torch.randn(6, 4, 16, 16), torch.randn(6, 4, 16, 16)
    w = torch.tensor([2.5, 0.0, 0.0, 0.0, 8.0, 0.0])  # only the groups' first samples' count
    text = family.encode_prompts(parts, prompts)
    ours = method.trajectory_loss(family, parts, CleanInputs(latents, text, None, []),
                                  Draws(torch.zeros(6, dtype=torch.long), noise, w))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, **SD_OPTIONS)
    ddpm = DDPMScheduler.from_pretrained(tiny_base, subfolder="scheduler")
    lcm = LCMScheduler.from_config(ddpm.config, timestep_scaling=10.0)
    ddim = DDIMScheduler.from_config(ddpm.config, set_alpha_to_one=False, clip_sample=False, thresholding=False,
                                     timestep_spacing="trailing", prediction_type=prediction_type)
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [999, 749, 499, 249]
    a = ddpm.alphas_cumprod
    leaders = [0, 4]
    cond, uncond = pipe.encode_prompt([prompts[i] for i in leaders], "cpu", 1, True)
    top = torch.tensor([999, 999])
    chain = noise[leaders] if start_from_noise else ddpm.add_noise(latents[leaders], noise[leaders], top)
    points = []
    with torch.no_grad():
        for t in ddim.timesteps:
            points.append(chain)
            eps_cond, eps_uncond = pipe.unet(chain, t, cond).sample, pipe.unet(chain, t, uncond).sample
            guided = eps_cond + w[leaders].view(-1, 1, 1, 1) * (eps_cond - eps_uncond)
            chain = torch.stack([ddim.step(guided[i], int(t), chain[i]).prev_sample for i in range(2)])
        noisy = torch.stack([points[i % 4][i // 4] for i in range(6)])
        t = torch.tensor([999, 749, 499, 249, 999, 749])
        student_text = torch.cat([cond[:1].expand(4, -1, -1), cond[1:].expand(2, -1, -1)])
        eps = student(noisy, t, student_text).sample
        rows = []
        for i in range(6):
            c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t[i])
            alpha, sigma = a[t[i]].sqrt(), (1 - a[t[i]]).sqrt()
            if prediction_type == "epsilon":
                x0 = (noisy[i] - sigma * eps[i]) / alpha
            else:  # the output is v
                x0 = alpha * noisy[i] - sigma * eps[i]
            rows.append(c_skip * noisy[i] + c_out * x0)
        d = torch.stack(rows) - chain[[0, 0, 0, 0, 1, 1]]
    expected = (torch.sqrt(d**2 + 0.001**2) - 0.001).mean()
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-7)
    ours.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in student.named_parameters())


def test_start_from_noise_gives_the_top_of_the_grid_pure_noise(tiny_base: Path, circles: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With start_from_noise, the sample drawn at the grid's top (999) reaches the student and
    the teacher as the noise alone (as LCMScheduler's first step gets it); the other sample
    as the scheduler noises its latents."""
    config = build_config(_raw(tiny_base, circles, Path("out"), **_method(start_from_noise=True)))
    family, method = get_family("sd"), make_method(config.method)
    parts = family.load(config.model)
    method.build(family, parts)
    seen = []
    real_predict = family.predict
    monkeypatch.setattr(family, "predict", lambda parts, inputs: seen.append(inputs) or real_predict(parts, inputs))
    latents, noise = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    text = family.encode_prompts(parts, ["red circle", "blue circle"])
    method.distill_loss(family, parts, CleanInputs(latents, text, None, []),
                        Draws(torch.tensor([49, 7]), noise, torch.tensor([3.0, 3.0])))
    ddpm = DDPMScheduler.from_pretrained(tiny_base, subfolder="scheduler")
    student, teacher = seen[0], seen[1]
    assert student.timesteps.tolist() == [999, 159]
    for inputs in (student, teacher):
        assert torch.equal(inputs.noisy[0], noise[0])
        torch.testing.assert_close(inputs.noisy[1], ddpm.add_noise(latents[1:], noise[1:], torch.tensor([159]))[0])


def test_draws_are_per_sample_and_in_range(tiny_base: Path, circles: Path) -> None:
    config = build_config(_raw(tiny_base, circles, Path("out"), **_method(w_min=3.0, w_max=4.0,
                                                                            num_ddim_timesteps=10)))
    method = make_method(config.method)
    latents = torch.zeros(3, 4, 8, 8)

    def generators(*seeds: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    draws = method.draw(CleanInputs(latents, {}, None, generators(1, 2, 3)))
    assert draws.index.shape == (3,) and ((0 <= draws.index) & (draws.index < 10)).all()
    assert ((3.0 <= draws.guidance) & (draws.guidance <= 4.0)).all()
    alone = method.draw(CleanInputs(latents[:1], {}, None, generators(2)))  # sample 2, in another batch
    assert torch.equal(alone.noise[0], draws.noise[1]) and alone.index[0] == draws.index[1]


# --- (2), (4) a run on tiny SD: final/ in diffusers, validation and generate with LCM ----------------

@pytest.fixture(scope="module")
def sd_run(tiny_base: Path, circles: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("distill") / "run"
    with pytest.MonkeyPatch.context() as patch:
        seen = pipeline_calls(patch, StableDiffusionPipeline)
        config = build_config(_raw(tiny_base, circles, out))
        final = train(config)
    return {"config": config, "final": final, "validation": seen, "out": out}


def test_a_distilled_lora_loads_in_diffusers_and_samples_with_lcm_in_4_steps(tiny_base: Path,
                                                                             sd_run: dict[str, Any]) -> None:
    final = sd_run["final"]
    assert final is not None and (final / "pytorch_lora_weights.safetensors").is_file()
    losses = [e["loss"] for e in read_events(sd_run["out"]) if e["event"] == "step"]
    assert len(losses) == 2 and all(np.isfinite(loss) and loss > 0 for loss in losses)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_base, **SD_OPTIONS)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    before = _lcm_image(pipe)
    pipe.load_lora_weights(final)
    after = _lcm_image(pipe)
    assert np.isfinite(after).all() and after.shape == (64, 64, 3)
    assert not np.allclose(before, after, atol=1e-4), "the distilled LoRA changed nothing"
    usage = make_method(sd_run["config"].method).usage(get_family("sd"), "me/lcm-lora", str(tiny_base))
    assert "pipe.load_lora_weights" in usage and "LCMScheduler.from_config" in usage
    assert "num_inference_steps=4, guidance_scale=1.0" in usage


def test_the_kohya_export_of_a_distilled_lora_samples_as_the_diffusers_file(tiny_base: Path, sd_run: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    """ComfyUI and A1111 load LCM-LoRAs in kohya's names: the export names the UNet's modules
    and samples as final/ does."""
    kohya = load_file(export_lora(sd_run["out"], tmp_path / "lcm-kohya.safetensors"))
    assert kohya and all(key.startswith("lora_unet_") for key in kohya)
    images = []
    for weights in (sd_run["final"], tmp_path / "lcm-kohya.safetensors"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_base, **SD_OPTIONS)
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(weights)
        images.append(_lcm_image(pipe))
    assert np.abs(images[0] - images[1]).max() < 1e-5


def test_validation_and_generate_sample_with_lcm_at_4_steps_and_guidance_1(
        sd_run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    validation = sd_run["config"].validation
    assert (validation.scheduler, validation.steps, validation.guidance_scale) == ("LCMScheduler", 4, 1.0)
    assert sd_run["validation"] and all(call == {"steps": 4, "guidance": 1.0, "scheduler": "LCMScheduler", "spacing": "leading"}
                                        for call in sd_run["validation"])
    assert (sd_run["out"] / "validation" / "step-000002").is_dir()
    recorded = (sd_run["out"] / "config.toml").read_text()
    assert 'scheduler = "LCMScheduler"' in recorded and "steps = 4" in recorded
    seen = pipeline_calls(monkeypatch, StableDiffusionPipeline)
    out = tmp_path / "out.png"
    assert main(["generate", "--lora", str(sd_run["out"]), "--prompt", "red circle", "--out", str(out)]) == 0
    assert seen == [{"steps": 4, "guidance": 1.0, "scheduler": "LCMScheduler", "spacing": "leading"}]
    assert out.is_file()


def test_the_config_still_sets_validation_sampling(tiny_base: Path, circles: Path) -> None:
    raw = _raw(tiny_base, circles, Path("out"))
    raw["validation"] |= {"steps": 8, "scheduler": "TCDScheduler"}
    validation = build_config(raw).validation
    assert (validation.scheduler, validation.steps, validation.guidance_scale) == ("TCDScheduler", 8, 1.0)
    validation = build_config(_raw(tiny_base, circles, Path("out"), kind="lora")).validation
    assert (validation.scheduler, validation.steps, validation.guidance_scale) == (None, 20, 7.5)


@pytest.mark.parametrize("target", ["consistency", "trajectory"])
def test_a_resumed_distill_run_equals_an_unbroken_one(tiny_base: Path, circles: Path, tmp_path: Path,
                                                      target: str) -> None:
    """The draws (grid index, noise, w) come from each sample's generator and the adapters
    are checkpointed exactly, so a run resumed at step 1 ends where an unbroken one does
    (with trajectory targets too: a batch of 2 is one chain on a grid of 2)."""
    def config(out: str, steps: int) -> Any:
        raw = _raw(tiny_base, circles, tmp_path / out, validate=False,
                   **_method(target=target, num_ddim_timesteps=2 if target == "trajectory" else 50))
        raw["train"] |= {"max_steps": steps, "checkpoint_every": 1}
        return build_config(raw)

    Run(config("a", 3)).fit()
    Run(config("b", 1)).fit()
    resumed = Run(config("b", 3))
    assert resumed.resume_from is not None and resumed.resume_from.name == "step-000001"
    resumed.fit()
    a, b = (load_file(tmp_path / out / "final" / "pytorch_lora_weights.safetensors") for out in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# --- (3) tiny SDXL --------------------------------------------------------------------------------

def ssd_1b_shaped(base: Path) -> None:
    """The base's UNet made as SSD-1B's is (segmind/SSD-1B): fewer transformer layers in
    some blocks, set per layer, and the up blocks' own depths
    (reverse_transformer_layers_per_block), which diffusers builds from the config."""
    from diffusers import UNet2DConditionModel

    config = dict(UNet2DConditionModel.load_config(base / "unet"))
    config |= {"transformer_layers_per_block": [[1, 1], [2, 1]],
               "reverse_transformer_layers_per_block": [[1, 2, 1], [1, 1, 1]]}
    unet = UNet2DConditionModel.from_config(config)
    depths = [len(attention.transformer_blocks) for attention in unet.down_blocks[1].attentions]
    assert depths == [2, 1] and len(unet.up_blocks[0].attentions[1].transformer_blocks) == 2
    shutil.rmtree(base / "unet")
    unet.save_pretrained(base / "unet")


@pytest.mark.parametrize("shape", ["sdxl", "ssd-1b"])
def test_a_distilled_sdxl_lora_loads_in_diffusers_and_samples_with_lcm(circles: Path, tmp_path: Path,
                                                                       shape: str) -> None:
    base = build_tiny_sdxl(tmp_path / "tiny-sdxl", WORDS, seed=0)
    distill: dict[str, Any] = {"w_min": 3.0}
    if shape == "ssd-1b":  # and the trajectory targets, with SDXL's pooled text and geometry
        ssd_1b_shaped(base)
        distill |= {"target": "trajectory", "num_ddim_timesteps": 4}
    final = train(build_config(_raw(base, circles, tmp_path / "run", "sdxl", validate=False,
                                    **_method(**distill))))
    assert final is not None and (final / "pytorch_lora_weights.safetensors").is_file()
    summary = next(e for e in read_events(tmp_path / "run") if e["event"] == "start")["summary"]
    notes = [line for line in summary if line.startswith("note: ") and "trajectory" in line]
    if shape == "ssd-1b":  # a batch of 2 trains on the top 2 points of each chain of 4
        assert len(notes) == 1 and "a batch holds 2" in notes[0] and "chain of 4" in notes[0]
    else:
        assert notes == []
    pipe = StableDiffusionXLPipeline.from_pretrained(base, add_watermarker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    before = _lcm_image(pipe)
    pipe.load_lora_weights(final)
    after = _lcm_image(pipe)
    assert np.isfinite(after).all() and not np.allclose(before, after, atol=1e-4)


# --- (5) refusals, before any model loads ------------------------------------------------------------

def test_bad_settings_are_refused_when_the_config_loads(tiny_base: Path, circles: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", no_loading)
    with pytest.raises(ConfigError, match=r"w_min \(9\) is above w_max \(6\)"):
        build_config(_raw(tiny_base, circles, Path("out"), **_method(w_min=9.0, w_max=6.0)))
    no_lora = _method()
    del no_lora["lora"]
    with pytest.raises(ConfigError, match=r"method\.lora"):
        build_config(_raw(tiny_base, circles, Path("out"), **no_lora))
    with pytest.raises(ConfigError, match=r"method\.distill"):
        build_config(_raw(tiny_base, circles, Path("out"), kind="distill", lora={"rank": 4}))
    with pytest.raises(ConfigError, match=r"method\.distill\.loss"):
        build_config(_raw(tiny_base, circles, Path("out"), **_method(loss="l1")))
    for option, value in (("snr_gamma", 5.0), ("noise_offset", 0.05), ("input_perturbation", 0.1)):
        raw = _raw(tiny_base, circles, Path("out"))
        raw["objective"] = {option: value}  # read by the denoising loss, which distill replaces
        with pytest.raises(ConfigError, match=rf"objective\.{option}: method 'distill' trains with the consistency"):
            build_config(raw)
    flux = _raw(tiny_base, circles, Path("out"), "flux")
    flux["model"]["pretrained"] = "black-forest-labs/FLUX.1-dev"  # not here: the family's own refusal
    with pytest.raises(ConfigError, match=r"method.kind = 'distill': family 'flux'.* trains .*lora"):
        build_config(flux)


def test_the_presets_load_as_lcm_distillation() -> None:
    sd, sdxl = (load_config(ROOT / "configs" / family / "distill_lcm.toml") for family in ("sd", "sdxl"))
    for config in (sd, sdxl):
        method = config.method
        assert method.kind == "distill" and method.distill.kind == "lcm" and method.result == "lora"
        assert (method.lora.rank, method.lora.alpha, method.distill.loss) == (64, 64, "huber")
        assert (config.validation.scheduler, config.validation.steps, config.validation.guidance_scale) == (
            "LCMScheduler", 4, 1.0)
    assert (sd.method.distill.w_min, sdxl.method.distill.w_min, sdxl.model.family) == (5.0, 3.0, "sdxl")
    assert sd.method.lora.target_modules == sdxl.method.lora.target_modules == list(LCM_TARGETS)
