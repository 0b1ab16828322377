"""Every (family, method) pair a family claims: a few steps on a tiny base of that family
(with a text cache, a latent cache and buckets where they apply), then what final/ holds
is loaded with diffusers' own classes, as a user would, and generates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import WORDS, run_config
from diffusers import (
    ControlNetModel,
    CogView4ControlPipeline,
    CogView4Pipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxControlPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImageEditPipeline,
    QwenImagePipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from difftune.config import ConfigError, build_config
from difftune.families import families
from difftune.families.cogview4.tiny import build_tiny_cogview4
from difftune.families.flux.tiny import build_tiny_flux
from difftune.families.qwenimage.tiny import build_tiny_qwenimage
from difftune.families.qwenimage_edit.tiny import build_tiny_qwenimage_edit
from difftune.families.sd.tiny import build_tiny_sd
from difftune.families.sd3.tiny import build_tiny_sd3
from difftune.families.sdxl.tiny import build_tiny_sdxl
from difftune.training.loop import train

PROMPT = "red circle with blue background"
# diffusers' own pipeline classes, written out (not the family's table): the check is independent.
PIPELINES = {
    "sd": ({"text_to_image": StableDiffusionPipeline, "controlnet": StableDiffusionControlNetPipeline},
           {"safety_checker": None, "requires_safety_checker": False}),
    "sdxl": ({"text_to_image": StableDiffusionXLPipeline, "controlnet": StableDiffusionXLControlNetPipeline},
             {"add_watermarker": False}),
    "flux": ({"text_to_image": FluxPipeline, "control": FluxControlPipeline, "controlnet": FluxControlNetPipeline,
              "edit": FluxKontextPipeline}, {}),
    "cogview4": ({"text_to_image": CogView4Pipeline, "control": CogView4ControlPipeline}, {}),
    "sd3": ({"text_to_image": StableDiffusion3Pipeline, "controlnet": StableDiffusion3ControlNetPipeline}, {}),
    "qwenimage": ({"text_to_image": QwenImagePipeline, "controlnet": QwenImageControlNetPipeline}, {}),
    "qwenimage_edit": ({"text_to_image": QwenImagePipeline, "edit": QwenImageEditPipeline}, {}),
}
# The ControlNet class, and the keyword the pipelines take a control image by, per family.
CONTROLNETS = {"sd": (ControlNetModel, "image"), "sdxl": (ControlNetModel, "image"),
               "flux": (FluxControlNetModel, "control_image"), "sd3": (SD3ControlNetModel, "control_image"),
               "qwenimage": (QwenImageControlNetModel, "control_image")}
BUILDERS = {"sd": build_tiny_sd, "sdxl": build_tiny_sdxl, "flux": build_tiny_flux, "cogview4": build_tiny_cogview4,
            "sd3": build_tiny_sd3, "qwenimage": build_tiny_qwenimage, "qwenimage_edit": build_tiny_qwenimage_edit}
METHODS: dict[str, dict[str, Any]] = {
    "controlnet": {"kind": "controlnet"},
    "control": {"kind": "control"},
    "lora": {"kind": "lora", "train_text_encoder": True, "lora": {"rank": 4, "init": "gaussian"}},
    "full": {"kind": "full", "ema": {"decay": 0.9}},
    "dreambooth": {"kind": "dreambooth", "lora": {"rank": 4},
                   "dreambooth": {"instance_prompt": PROMPT, "prior_preservation": True, "num_class_images": 2,
                                  "class_prompt": "circle", "sample_batch_size": 2, "class_generation_steps": 2}},
    "edit": {"kind": "edit", "lora": {"rank": 4}},
    "textual_inversion": {"kind": "textual_inversion", "textual_inversion": {
        "token": "<blob>", "init_token": "circle", "vectors": 2, "caption": "red {token} with blue background"}},
    "distill": {"kind": "distill", "distill": {"kind": "lcm", "num_ddim_timesteps": 10}, "lora": {"rank": 4}},
}
# What else each pair runs with: the caches and buckets go through the family's named
# conditioning and per-sample geometry.
DATA = {"controlnet": {"cache_text": True, "cache_latents": True}, "control": {"cache_text": True},
        "lora": {"buckets": True},
        "full": {"cache_text": True}, "dreambooth": {}, "textual_inversion": {"cache_latents": True},
        "edit": {"cache_latents": True}, "distill": {"cache_text": True}}
PAIRS = [(family, method) for family in sorted(families()) for method in sorted(families()[family].supports)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {name: BUILDERS[name](root / name, WORDS, seed=0) for name in families()}


def test_every_family_has_a_tiny_base_and_pipelines_here() -> None:
    """A new family adds itself to BUILDERS and PIPELINES, so the pairs below run for it."""
    assert set(families()) == set(BUILDERS) == set(PIPELINES)


@pytest.mark.parametrize(("family", "method"), PAIRS, ids=[f"{f}-{m}" for f, m in PAIRS])
def test_a_pair_trains_and_diffusers_loads_its_result(family: str, method: str, bases: dict[str, Path],
                                                      circles: Path, held_out: Path, tmp_path: Path) -> None:
    base = bases[family]
    controlled = method in ("controlnet", "control")
    data = circles
    if method == "edit":  # references and instructions; one row trains as text-to-image
        from difftune.data.synthetic import write_fill_circles_edit

        data = write_fill_circles_edit(tmp_path / "edits", 4, 64, seed=0)
    raw = run_config(base, data, tmp_path / "run", held_out if controlled else None,
                     train={"max_steps": 2, "checkpoint_every": 2}, validation={"every": 2, "steps": 2})
    raw["model"]["family"] = family
    raw["method"] = dict(METHODS[method])
    if not families()[family].text_encoder_trainable:
        raw["method"].pop("train_text_encoder", None)
    raw["data"] |= DATA[method]
    if not families()[family].caches_text:  # refused where a batch changes the encoding
        raw["data"].pop("cache_text", None)
    if method == "dreambooth":
        raw["method"]["dreambooth"]["class_data"] = str(tmp_path / "class")
    prompt = PROMPT.replace("circle", "<blob>") if method == "textual_inversion" else PROMPT
    if not controlled:
        raw["validation"]["prompts"] = [prompt]
    if method == "edit":
        raw["validation"] |= {"prompts": ["make the circle red"],
                              "images": [str(data / "reference_images" / "000000.png")]}
    final = train(build_config(raw))
    assert final is not None and (tmp_path / "run" / "validation" / "step-000002" / "pair-00-grid.png").is_file()
    classes, options = PIPELINES[family]
    control = Image.open(held_out / "conditioning_images" / "000000.png").convert("RGB")
    if method == "controlnet":
        model, keyword = CONTROLNETS[family]
        pipe = classes["controlnet"].from_pretrained(base, controlnet=model.from_pretrained(final), **options)
        assert _generate(pipe, **{keyword: control}).shape == (64, 64, 3)
    elif method == "control":
        pipe = classes["control"].from_pretrained(final, **options)
        assert _generate(pipe, control_image=control).shape == (64, 64, 3)
    elif method in ("lora", "dreambooth", "distill"):
        pipe = classes["text_to_image"].from_pretrained(base, **options)
        before = _generate(pipe)
        pipe.load_lora_weights(final)
        assert not np.allclose(before, _generate(pipe), atol=1e-4), "the LoRA changed nothing"
    elif method == "edit":
        if family == "qwenimage_edit":  # (its processor without torchvision: see the family)
            from difftune.families.qwenimage_edit.family import load_processor

            options = {**options, "processor": load_processor(str(base))}
        pipe = classes["edit"].from_pretrained(base, **options)
        reference = Image.open(data / "reference_images" / "000000.png").convert("RGB")
        # Kontext sizes the output and the reference for a megapixel unless told the target's area
        sized = {"max_area": 64 * 64, "_auto_resize": False} if family == "flux" else {}
        before = _generate(pipe, image=reference, **sized)
        pipe.load_lora_weights(final)
        assert not np.allclose(before, _generate(pipe, image=reference, **sized), atol=1e-4), \
            "the edit LoRA changed nothing"
    elif method == "textual_inversion":  # through results.py, as difftune generate loads it
        from difftune.families import get_family
        from difftune.results import RESULTS

        pipe = classes["text_to_image"].from_pretrained(base, **options)
        before = _generate(pipe)
        RESULTS["embedding"].attach(get_family(family), pipe, final)
        assert not np.allclose(before, _generate(pipe, prompt=prompt), atol=1e-4), "the token changed nothing"
    else:
        pipe = classes["text_to_image"].from_pretrained(final, **options)
        assert np.isfinite(_generate(pipe)).all()


def _generate(pipe: Any, prompt: str = PROMPT, **call: Any) -> np.ndarray:
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):  # flow matching samples with its own
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=prompt, num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **call).images[0]


def test_an_unknown_family_or_an_unsupported_pair_fails_when_the_config_loads(tiny_base: Path,
                                                                              circles: Path) -> None:
    raw = run_config(tiny_base, circles, Path("out"))
    raw["model"]["family"] = "sdx"
    with pytest.raises(ConfigError, match="unknown family 'sdx'.*'sdxl'"):
        build_config(raw)


def test_sdxl_defaults_to_its_native_resolution(tiny_base: Path, circles: Path) -> None:
    raw = run_config(tiny_base, circles, Path("out"))
    raw["model"]["family"] = "sdxl"
    del raw["data"]["resolution"]
    assert build_config(raw).data.resolution == 1024
    raw["model"]["family"] = "sd"
    assert build_config(raw).data.resolution == 512


def test_every_method_spec_builds_its_method_and_every_family_trains_listed_methods() -> None:
    """Each method folder's spec names its own kind, settings whose kind it is, and a
    factory that builds a method reporting that kind; every family trains only listed
    methods (so the pair check at config load covers every kind)."""
    from difftune.catalog import methods

    for kind, spec in methods().items():
        assert spec.settings.model_fields["kind"].default == kind
        if not any(field.is_required() for field in spec.settings.model_fields.values()):  # (DreamBooth's prompt)
            assert spec.make(spec.settings()).name == kind
    for family in families().values():
        assert family.supports <= set(methods()), family.name
        assert family.denoiser_name in family.components and set(family.text_encoder_names) <= set(family.components)


def test_the_family_registry_is_light() -> None:
    """Families are listed, and a config checked, before torch is imported (a typo in a
    config is reported in a fraction of a second)."""
    import subprocess
    import sys

    code = ("import sys; from difftune.families import families; names = sorted(families()); "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, names; print(names)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "'sdxl'" in done.stdout
