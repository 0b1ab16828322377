"""`difftune export controlnet`: a trained ControlNet as one file in the original layout,
read back by diffusers' own `ControlNetModel.from_single_file` to the same weights."""

from pathlib import Path

import pytest
import torch
from conftest import WORDS, run_config
from diffusers import ControlNetModel

from difftune.cli import main
from difftune.config import build_config
from difftune.families.sd.tiny import build_tiny_sd
from difftune.training.loop import train


@pytest.fixture(scope="module")
def x8_run(circles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ControlNet trained 2 steps on a base whose VAE downsamples x8 (as SD's)."""
    base = build_tiny_sd(tmp_path_factory.mktemp("x8") / "base", WORDS, size="test-x8", seed=0)
    out = tmp_path_factory.mktemp("x8-run") / "run"
    raw = run_config(base, circles, out, train={"max_steps": 2})
    raw["validation"] = {"every": 100}
    train(build_config(raw))
    return out


@pytest.mark.parametrize("half", [False, True])
def test_a_controlnet_run_exports_to_the_original_layout(half, x8_run, tmp_path, capsys) -> None:
    out = tmp_path / "controlnet.safetensors"
    assert main(["export", "controlnet", str(x8_run), str(out), *(["--half"] if half else [])]) == 0
    read = ControlNetModel.from_single_file(str(out), config=str(x8_run / "final"))
    trained = ControlNetModel.from_pretrained(x8_run / "final")
    expected, found = trained.state_dict(), read.state_dict()
    assert expected.keys() == found.keys()
    for key, tensor in expected.items():
        wanted = tensor.half().float() if half else tensor
        assert torch.equal(found[key].float(), wanted), key
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        names = list(handle.keys())
    assert all(name.startswith("control_model.") for name in names)
    assert "control_model.input_hint_block.14.weight" in names and "control_model.middle_block_out.0.weight" in names


def test_a_controlnet_of_another_vae_factor_is_refused_with_the_reason(finished_run, tmp_path, capsys) -> None:
    out = tmp_path / "c.safetensors"
    assert main(["export", "controlnet", str(finished_run), str(out)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "original ControlNet layout" in error and "from_pretrained" in error and not out.exists()


def test_export_controlnet_of_a_pipeline_is_refused(tiny_base, tmp_path, capsys) -> None:
    assert main(["export", "controlnet", str(tiny_base), str(tmp_path / "c.safetensors")]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "a whole pipeline folder, not a single model" in error and "expected a ControlNet folder" in error
