"""Fault injection: SIGKILL at random steps and in the middle of a save, then resume.
An interrupted run must end with the same weights, bit for bit, as one that never stopped."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import run_config
from safetensors.torch import load_file

from difftune.config import build_config, to_toml
from difftune.training.checkpoint import complete_checkpoints
from difftune.training.loop import train

HERE = Path(__file__).parent
STEPS = 8


def _config(base: Path, data: Path, out: Path, path: Path) -> Path:
    raw = run_config(base, data, out, train={"max_steps": STEPS, "checkpoint_every": 1, "batch_size": 4,
                                             "checkpoints_total_limit": 2})
    path.write_text(to_toml(build_config(raw)))
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "diffusion_pytorch_model.safetensors")


def _reference(base: Path, data: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    raw = run_config(base, data, tmp_path / "straight", train={"max_steps": STEPS, "checkpoint_every": 1,
                                                                "batch_size": 4, "checkpoints_total_limit": 2})
    train(build_config(raw))
    return _weights(tmp_path / "straight")


def _last_step(run: Path) -> int:
    events = run / "events.jsonl"
    if not events.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in events.read_text().splitlines() if '"step"' in line]
    return max(steps, default=0)


def _kill_after(config: Path, run: Path, step: int) -> int:
    """Start training, SIGKILL it once events show `step` (it may be a little further)."""
    child = subprocess.Popen([sys.executable, "-m", "difftune", "train", str(config)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while child.poll() is None and _last_step(run) < step and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    return child.wait()


def test_sigkill_at_random_steps_then_resume_gives_identical_weights(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    reference = _reference(tiny_base, circles, tmp_path)
    run = tmp_path / "killed"
    config = _config(tiny_base, circles, run, tmp_path / "c.toml")
    kill_points = sorted(random.Random(0).sample(range(1, STEPS), 3))
    for step in kill_points:
        _kill_after(config, run, step)
        assert not (run / "final").exists()
        found = complete_checkpoints(run)
        assert found and all((c / "COMPLETE").is_file() for c in found)
    done = subprocess.run([sys.executable, "-m", "difftune", "train", str(config)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = _weights(run)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    starts = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "start" for e in starts) == len(kill_points) + 1


def test_sigkill_during_a_save_leaves_no_checkpoint_half_written(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    reference = _reference(tiny_base, circles, tmp_path)
    run = tmp_path / "killed"
    config = _config(tiny_base, circles, run, tmp_path / "c.toml")
    died = subprocess.run([sys.executable, str(HERE / "fault_child.py"), str(config), "kill-during-save", "5"],
                          capture_output=True, text=True, timeout=300)
    assert died.returncode == -signal.SIGKILL
    assert [c.name for c in complete_checkpoints(run)] == ["step-000003", "step-000004"]
    assert (run / "checkpoints" / ".step-000005.partial").is_dir()  # the half-written save
    done = subprocess.run([sys.executable, "-m", "difftune", "train", str(config)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list((run / "checkpoints").glob(".*.partial"))
    resumed = _weights(run)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
