from pathlib import Path

import pytest

from difftune.config import ConfigError, build_config, load_config, to_toml

MINIMAL = {"model": {"pretrained": "base"}, "data": {"path": "d"}, "train": {"output_dir": "o"}}


def _problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build_config(raw)
    return caught.value.problems


def _with(**sections: dict) -> dict:
    raw = {key: dict(value) for key, value in MINIMAL.items()}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def test_all_problems_reported_together_with_key_paths() -> None:
    problems = _problems(
        _with(
            model={"pretrainde": "x"},
            data={"resolution": 60, "proportion_empty_prompts": 1.5},
            train={"learning_rate": "fast", "lr_scheduler": "warp", "batch_size": 0},
            validation={"prompts": ["a", "b"], "images": ["1", "2", "3"]},
        )
    )
    text = "\n".join(problems)
    assert "model.pretrainde: unknown key" in text
    assert "data.resolution: must be divisible by 8 (got 60)" in text
    assert "data.proportion_empty_prompts" in text
    assert "train.learning_rate" in text and "'fast'" in text
    assert "train.lr_scheduler" in text
    assert "train.batch_size" in text
    assert "validation: 2 prompts and 3 images" in text
    assert len(problems) == 7


def test_missing_required_keys_named() -> None:
    problems = _problems({"model": {}, "train": {}})
    assert set(problems) == {
        "model.pretrained: required key is missing",
        "data: required key is missing",
        "train.output_dir: required key is missing",
    }


@pytest.mark.parametrize(
    "prompts,images,ok",
    [(["a"], ["1", "2"], True), (["a", "b"], ["1"], True), (["a", "b"], ["1", "2"], True),
     (["a"], [], True), ([], ["1"], False), (["a", "b"], ["1", "2", "3"], False)],
)
def test_validation_prompt_image_counts(prompts: list, images: list, ok: bool) -> None:
    # prompts alone suit a method without conditioning images; a ControlNet needs them
    raw = _with(validation={"prompts": prompts, "images": images}, **({"method": {"kind": "full"}} if not images else {}))
    if ok:
        pairs = build_config(raw).validation.pairs()
        assert len(pairs) == max(len(prompts), len(images))
    else:
        assert any(p.startswith("validation:") for p in _problems(raw))


def test_overrides_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[model]\npretrained = "b"\n[data]\npath = "d"\n[train]\noutput_dir = "o"\n')
    config = load_config(path, ["train.max_steps=10", "data.path=some/folder", "train.mixed_precision=bf16"])
    assert config.train.max_steps == 10
    assert config.data.path == "some/folder"
    assert config.train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(path, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="train.nonsense: unknown key"):
        load_config(path, ["train.nonsense=1"])


def test_bad_toml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    config = build_config(_with(validation={"prompts": ['say "hi"'], "images": ["c.png"]}))
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_every_preset_loads() -> None:
    presets = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.toml"))
    assert presets
    for preset in presets:
        load_config(preset)


def test_sd_presets_are_the_methods_they_are_named_after() -> None:
    root = Path(__file__).resolve().parents[1] / "configs" / "sd"
    lora, dreambooth, dreambooth_lora, full = (
        load_config(root / f"{name}.toml").method for name in ("lora", "dreambooth", "dreambooth_lora", "full")
    )
    assert lora.kind == "lora" and lora.lora is not None and lora.lora.rank == 4
    assert dreambooth.kind == "dreambooth" and not dreambooth.uses_lora
    assert dreambooth.dreambooth is not None and dreambooth.dreambooth.prior_preservation
    assert dreambooth_lora.kind == "dreambooth" and dreambooth_lora.uses_lora
    assert full.kind == "full" and full.ema is not None and full.ema.decay == 0.9999


def test_sdxl_presets_are_the_methods_they_are_named_after() -> None:
    root = Path(__file__).resolve().parents[1] / "configs" / "sdxl"
    presets = {name: load_config(root / f"{name}.toml") for name in ("controlnet", "lora", "dreambooth_lora", "full")}
    assert all(c.model.family == "sdxl" and c.data.resolution == 1024 and c.model.vae for c in presets.values())
    assert presets["controlnet"].method.kind == "controlnet"
    assert presets["lora"].method.kind == "lora" and presets["lora"].data.buckets
    assert presets["dreambooth_lora"].method.kind == "dreambooth" and presets["dreambooth_lora"].method.uses_lora
    assert presets["full"].method.kind == "full" and presets["full"].method.ema is not None


def test_flux_presets_are_the_methods_they_are_named_after() -> None:
    root = Path(__file__).resolve().parents[1] / "configs" / "flux"
    presets = {name: load_config(root / f"{name}.toml")
               for name in ("lora", "dreambooth_lora", "full", "control", "control_lora", "controlnet")}
    assert all(c.model.family == "flux" and c.train.mixed_precision == "bf16" for c in presets.values())
    assert presets["control"].method.kind == "control" and not presets["control"].method.uses_lora
    assert presets["control_lora"].method.kind == "control" and presets["control_lora"].method.uses_lora
    assert presets["controlnet"].method.kind == "controlnet" and presets["controlnet"].method.controlnet_single_blocks == 0
    assert presets["lora"].method.kind == "lora" and presets["lora"].objective.timestep_sampling == "logit_normal"
    assert presets["dreambooth_lora"].method.uses_lora and presets["dreambooth_lora"].model.guidance == 1.0
    assert presets["full"].method.kind == "full"


def test_cogview4_presets_are_the_methods_they_are_named_after() -> None:
    root = Path(__file__).resolve().parents[1] / "configs" / "cogview4"
    presets = {name: load_config(root / f"{name}.toml") for name in ("control", "control_lora", "lora")}
    assert all(c.model.family == "cogview4" and c.train.mixed_precision == "bf16" for c in presets.values())
    assert presets["control"].method.kind == "control" and presets["control_lora"].method.uses_lora
    assert presets["lora"].method.kind == "lora"
