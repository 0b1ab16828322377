"""Step-distilled bases (SDXL Turbo, LCM): validation and `difftune generate` sample them with
the base's own scheduler, steps and guidance (read from its scheduler config), which the
config can override; a full fine-tune of one is warned about. Checked on tiny pipelines
whose scheduler is Turbo's (Euler ancestral, trailing steps) or LCM's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import WORDS, pipeline_calls, run_config
from diffusers import (
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)

from difftune.cli import main
from difftune.config import ConfigError, build_config
from difftune.families.sdxl.tiny import build_tiny_sdxl
from difftune.rundir import read_events
from difftune.sampling import read_base_sampling
from difftune.training.loop import train

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}


@pytest.fixture(scope="module")
def turbo_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL carrying SDXL Turbo's scheduler config (Euler ancestral, trailing)."""
    base = build_tiny_sdxl(tmp_path_factory.mktemp("turbo") / "tiny-turbo", WORDS, seed=0)
    shutil.rmtree(base / "scheduler")
    EulerAncestralDiscreteScheduler(timestep_spacing="trailing", **SD_BETAS).save_pretrained(base / "scheduler")
    index = json.loads((base / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
    (base / "model_index.json").write_text(json.dumps(index))
    return base


@pytest.fixture(scope="module")
def lcm_sd(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD base carrying an LCMScheduler."""
    base = Path(shutil.copytree(tiny_base, tmp_path_factory.mktemp("lcm") / "tiny-lcm"))
    shutil.rmtree(base / "scheduler")
    LCMScheduler(**SD_BETAS).save_pretrained(base / "scheduler")
    index = json.loads((base / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "LCMScheduler"]
    (base / "model_index.json").write_text(json.dumps(index))
    return base


def _run(base: Path, data: Path, out: Path, family: str, **method: Any) -> dict:
    raw = run_config(base, data, out, train={"max_steps": 2, "checkpoint_every": 2},
                     validation={"every": 2, "prompts": ["red circle with blue background"], "num_images": 1})
    raw["model"]["family"] = family
    raw["method"] = method or {"kind": "lora"}
    raw["validation"].pop("steps", None)  # the base's own
    return raw


def test_the_base_says_how_it_samples() -> None:
    assert read_base_sampling("/nowhere").kind == "standard"


def test_a_lora_on_a_turbo_base_validates_with_its_scheduler_at_guidance_0(turbo_sdxl: Path, circles: Path,
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    seen = pipeline_calls(monkeypatch, StableDiffusionXLPipeline)
    raw = _run(turbo_sdxl, circles, tmp_path / "run", "sdxl")
    config = build_config(raw)
    assert (config.validation.steps, config.validation.guidance_scale, config.validation.scheduler) == (
        1, 0.0, "EulerAncestralDiscreteScheduler")
    final = train(config)
    assert seen and all(call == {"steps": 1, "guidance": 0.0, "scheduler": "EulerAncestralDiscreteScheduler",
                                 "spacing": "trailing"} for call in seen)
    event = next(e for e in read_events(tmp_path / "run") if e["event"] == "sampling")
    assert (event["distilled"], event["warning"]) == ("turbo", None)
    recorded = (tmp_path / "run" / "config.toml").read_text()
    assert 'scheduler = "EulerAncestralDiscreteScheduler"' in recorded and "steps = 1" in recorded
    # generate with the run: its steps, guidance and scheduler
    seen.clear()
    out = tmp_path / "out.png"
    assert main(["generate", "--lora", str(final.parent), "--prompt", "red circle", "--out", str(out)]) == 0
    assert seen == [{"steps": 1, "guidance": 0.0, "scheduler": "EulerAncestralDiscreteScheduler",
                     "spacing": "trailing"}]


def test_the_config_overrides_what_the_base_says(turbo_sdxl: Path, circles: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen = pipeline_calls(monkeypatch, StableDiffusionXLPipeline)
    raw = _run(turbo_sdxl, circles, tmp_path / "run", "sdxl")
    raw["validation"] |= {"steps": 3, "guidance_scale": 2.0, "scheduler": "UniPCMultistepScheduler"}
    train(build_config(raw))
    assert seen and all(call["steps"] == 3 and call["guidance"] == 2.0 and call["scheduler"] ==
                        "UniPCMultistepScheduler" for call in seen)
    raw["validation"]["scheduler"] = "UniPCScheduler"
    with pytest.raises(ConfigError, match="validation.scheduler.*'UniPCScheduler' is not a diffusers scheduler"):
        build_config(raw)


def test_a_full_fine_tune_of_a_turbo_base_is_warned_about_and_keeps_its_scheduler(
        turbo_sdxl: Path, circles: Path, tmp_path: Path) -> None:
    final = train(build_config(_run(turbo_sdxl, circles, tmp_path / "run", "sdxl", kind="full")))
    event = next(e for e in read_events(tmp_path / "run") if e["event"] == "sampling")
    assert "undoes its few-step sampling" in event["warning"] and "[method.lora]" in event["warning"]
    saved = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert (saved["_class_name"], saved["timestep_spacing"]) == ("EulerAncestralDiscreteScheduler", "trailing")


def test_generate_samples_an_lcm_base_in_4_steps_at_guidance_1(lcm_sd: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    seen = pipeline_calls(monkeypatch, StableDiffusionPipeline)
    out = tmp_path / "out.png"
    assert main(["generate", "--base", str(lcm_sd), "--prompt", "red circle", "--out", str(out)]) == 0
    assert seen == [{"steps": 4, "guidance": 1.0, "scheduler": "LCMScheduler", "spacing": "leading"}]
    assert ("using steps 4, guidance scale 1.0, scheduler LCMScheduler (the base is step-distilled, latent "
            "consistency (LCM))") in " ".join(capsys.readouterr().err.split())
    seen.clear()
    assert main(["generate", "--base", str(lcm_sd), "--prompt", "red circle", "--out", str(out), "--overwrite",
                 "--steps", "2", "--scheduler", "UniPCMultistepScheduler"]) == 0
    assert seen[0]["steps"] == 2 and seen[0]["scheduler"] == "UniPCMultistepScheduler"
    assert main(["generate", "--base", str(lcm_sd), "--prompt", "x", "--out", str(out), "--overwrite",
                 "--scheduler", "Nope"]) == 2
    assert "--scheduler 'Nope' is not a diffusers scheduler class" in capsys.readouterr().err


def test_a_standard_base_keeps_the_family_sampler(tiny_base: Path, circles: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seen = pipeline_calls(monkeypatch, StableDiffusionPipeline)
    train(build_config(_run(tiny_base, circles, tmp_path / "run", "sd")))
    assert seen and all(call["steps"] == 20 and call["guidance"] == 7.5 and call["scheduler"] ==
                        UniPCMultistepScheduler.__name__ for call in seen)
    assert not [e for e in read_events(tmp_path / "run") if e["event"] == "sampling"]
