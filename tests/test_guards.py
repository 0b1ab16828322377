"""Never lose a run: non-finite losses are skipped, never saved; SIGTERM checkpoints and exits 0."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import poison_loss, run_config
from safetensors.torch import load_file

from difftune.config import build_config, to_toml
from difftune.training.events import read_events
from difftune.training.guards import NonFiniteLoss
from difftune.training.loop import Run


def test_nonfinite_steps_are_skipped(monkeypatch, tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    poison_loss(monkeypatch, {2, 3})
    Run(build_config(run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": 5}))).fit()
    events = read_events(tmp_path / "run")
    assert [e["step"] for e in events if e["event"] == "nonfinite"] == [2, 3]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5]
    weights = load_file(tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_nonfinite_steps_stop_the_run(monkeypatch, tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    poison_loss(monkeypatch, set(range(3, 100)))
    raw = run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": 10, "max_nonfinite_steps": 2})
    with pytest.raises(NonFiniteLoss, match="3 steps in a row"):
        Run(build_config(raw)).fit()
    saved = sorted((tmp_path / "run" / "checkpoints").iterdir())
    # steps 3 and 4 were skipped (no update), so step 4's checkpoint equals step 2's weights
    assert [p.name for p in saved] == ["step-000002", "step-000004"]
    two, four = (load_file(p / "controlnet" / "diffusion_pytorch_model.safetensors") for p in saved)
    assert all(torch.isfinite(v).all() and torch.equal(v, four[k]) for k, v in two.items())
    assert not (tmp_path / "run" / "final").exists()


def test_sigterm_checkpoints_and_exits_cleanly(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": 400, "checkpoint_every": 1000})
    config = tmp_path / "c.toml"
    config.write_text(to_toml(build_config(raw)))
    process = subprocess.Popen([sys.executable, "-m", "difftune", "train", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = tmp_path / "run" / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and '"event": "step"' not in (events.read_text() if events.exists() else ""):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    stopped = [e for e in read_events(tmp_path / "run") if e["event"] == "stopped"]
    assert len(stopped) == 1 and 0 < stopped[0]["step"] < 400
    checkpoint = tmp_path / "run" / "checkpoints" / f"step-{stopped[0]['step']:06d}"
    assert (checkpoint / "COMPLETE").is_file()
    assert not (tmp_path / "run" / "final").exists()
    assert "run the same command again" in stderr


def test_nonfinite_micro_batch_skips_its_whole_accumulation_window(monkeypatch, tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    poison_loss(monkeypatch, {1, 3})  # the first micro-batch of windows 1 and 2
    raw = run_config(tiny_base, circles, tmp_path / "run",
                     train={"max_steps": 4, "gradient_accumulation_steps": 2, "max_nonfinite_steps": 1})
    with pytest.raises(NonFiniteLoss, match="2 steps in a row"):
        Run(build_config(raw)).fit()
    events = read_events(tmp_path / "run")
    assert [(e["step"], e["in_a_row"]) for e in events if e["event"] == "nonfinite"] == [(1, 1), (2, 2)]
    lines = (tmp_path / "run" / "events.jsonl").read_text()
    assert "NaN" not in lines  # strict JSON: a skipped step's loss is null


def test_full_disk_stops_before_writing_a_checkpoint(monkeypatch, tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    import shutil
    from collections import namedtuple

    import difftune.training.checkpoint as checkpoint_module
    from difftune.training.checkpoint import DiskSpaceError

    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    space = {"free": None}

    def disk_usage(path):
        found = real(path)
        return found if space["free"] is None else usage(found.total, found.used, space["free"])

    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", disk_usage)
    out = tmp_path / "run"
    raw = run_config(tiny_base, circles, out, train={"max_steps": 4, "checkpoint_every": 2})
    run = Run(build_config(raw))
    real_checkpoint = run._checkpoint

    def fill_disk_after_first(state):
        real_checkpoint(state)
        space["free"] = 1024  # 1 kB left after the step-2 checkpoint

    run._checkpoint = fill_disk_after_first
    with pytest.raises(DiskSpaceError, match="not enough disk space for the step-4 checkpoint.*step-000002"):
        run.fit()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # nothing half-written
    assert [e for e in read_events(out) if e["event"] == "disk_full"][0]["step"] == 4
    space["free"] = None
    resumed = Run(build_config(raw))
    assert resumed.fit() == out / "final"
    assert [e["step"] for e in read_events(out) if e["event"] == "start"] == [0, 2]
