"""A run must not end as if it had trained: when every optimizer step was skipped (a NaN
or infinite loss or gradient) it fails, without final/ and without "done"; when some
were, it finishes and says how many, with a warning when most were."""

import io
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import poison_loss, run_config
from rich.console import Console
from safetensors.torch import load_file, save_file

from difftune.cli import main
from difftune.config import build_config, to_toml
from difftune.training.events import read_events
from difftune.training.loop import Run


def _nan_base(tiny_base: Path, where: Path) -> Path:
    """tiny_base with NaN in its UNet's last convolution: every prediction, so every loss,
    is NaN, while the ControlNet (a copy of the UNet's encoder half) stays finite."""
    base = where / "nan-base"
    shutil.copytree(tiny_base, base)
    file = base / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(file)
    weights["conv_out.weight"] = torch.full_like(weights["conv_out.weight"], float("nan"))
    save_file(weights, file)
    return base


def _config(base: Path, data: Path, out: Path, **train: object) -> dict:
    raw = run_config(base, data, out, train={"checkpoint_every": 100, **train})
    raw["validation"] = {"every": 100}
    return raw


def test_a_run_whose_every_step_was_skipped_fails_without_final_or_done(tiny_base, circles, tmp_path, capsys):
    raw = _config(_nan_base(tiny_base, tmp_path), circles, tmp_path / "run", max_steps=3)
    config = tmp_path / "run.toml"
    config.write_text(to_toml(build_config(raw)))
    code = main(["train", str(config)])
    out, err = capsys.readouterr()
    assert code == 2, err
    said = " ".join((out + err).split())
    assert re.search(r"no optimizer step trained: all 3 steps of this run were skipped", said), said
    assert "train.learning_rate" in said and "train.mixed_precision" in said
    assert "done:" not in said
    assert not (tmp_path / "run" / "final").exists()
    assert [e["trained"] for e in read_events(tmp_path / "run") if e["event"] == "skipped_steps"] == [0]


@pytest.mark.parametrize("bad_calls, said", [
    ({2, 3}, r"^(?!warning).*2 of 5 optimizer steps were skipped"),
    ({1, 2, 4, 5}, r"^warning: 4 of 5 optimizer steps were skipped.*train\.learning_rate"),
])
def test_a_run_with_skipped_steps_finishes_and_says_how_many(bad_calls, said, monkeypatch, tiny_base, circles,
                                                             tmp_path) -> None:
    poison_loss(monkeypatch, bad_calls)
    console = Console(file=io.StringIO(), width=400)
    raw = _config(tiny_base, circles, tmp_path / "run", max_steps=5)
    assert Run(build_config(raw), console=console).fit() == tmp_path / "run" / "final"
    lines = console.file.getvalue().splitlines()
    assert any(re.search(said, line) for line in lines), lines
    summary = [e for e in read_events(tmp_path / "run") if e["event"] == "skipped_steps"]
    assert [(e["trained"], e["nonfinite"]) for e in summary] == [(5 - len(bad_calls), len(bad_calls))]
