"""Shared fixtures: a tiny SD pipeline and fill-circles data, built locally (no network)."""

from __future__ import annotations

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="difftune-hf-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE, "datasets"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFTUNE_CACHE", os.path.join(_CACHE, "difftune"))  # runs that choose the cache
# A fixed thread count: train.cpu_threads = "auto" follows the load of the machine, and a
# different thread count sums in another order, so a resumed run compared bit for bit
# with an unbroken one would depend on what else the machine runs (tests/test_threads.py
# removes it to test the governor). One thread: the tiny models gain nothing from two,
# the two-process tests then take one core each, and beside another busy process (a
# shared CI box) two spinning OpenMP threads fall to a fraction of one (training/threads.py).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path
from typing import Any

import pytest

from difftune.data.synthetic import pil_colour_names, write_fill_circles
from difftune.families.sd.tiny import build_tiny_sd

WORDS = pil_colour_names() + ["circle", "with", "background"]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """diffusers' fast-test SD configuration, saved so from_pretrained reads it."""
    return build_tiny_sd(tmp_path_factory.mktemp("base") / "tiny-sd", WORDS, size="test", seed=0)


@pytest.fixture(scope="session")
def circles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fill_circles(tmp_path_factory.mktemp("data") / "circles", 12, 64, seed=0)


@pytest.fixture(scope="session")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fill_circles(tmp_path_factory.mktemp("held") / "circles", 2, 64, seed=1)


def run_config(base: Path, data_dir: Path, out: Path, held: Path | None = None, **sections: Any) -> dict:
    """A small, fast ControlNet run config as a raw dict; sections override keys."""
    raw: dict[str, Any] = {
        "model": {"pretrained": str(base)},
        "method": {"kind": "controlnet"},
        "data": {"path": str(data_dir), "resolution": 64},
        "train": {
            "output_dir": str(out),
            "batch_size": 2,
            "max_steps": 4,
            "learning_rate": 1e-3,
            "lr_warmup_steps": 0,
            "checkpoint_every": 2,
            "report_to": "none",
        },
        "validation": {"every": 2, "num_images": 1, "steps": 2},
    }
    if held is not None:
        raw["validation"]["prompts"] = ["red circle with blue background"]
        raw["validation"]["images"] = [str(held / "conditioning_images" / "000000.png")]
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture(scope="session")
def finished_run(tiny_base: Path, circles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step ControlNet run with a checkpoint at each step (copy it to change it)."""
    from difftune.config import build_config
    from difftune.training.loop import train

    out = tmp_path_factory.mktemp("finished") / "run"
    raw = run_config(tiny_base, circles, out, train={"max_steps": 2, "checkpoint_every": 1})
    raw["validation"] = {"every": 100}
    train(build_config(raw))
    return out


def copy_run(run: Path, where: Path) -> Path:
    """A copy of a run directory to change (a fixture's run stays as it is)."""
    import shutil

    target = where / run.name
    shutil.copytree(run, target)
    return target


def unfinished(run: Path) -> Path:
    """The run as if killed after its last checkpoint, before final/."""
    import shutil

    shutil.rmtree(run / "final")
    events = [line for line in (run / "events.jsonl").read_text().splitlines() if '"event": "final"' not in line]
    (run / "events.jsonl").write_text("\n".join(events) + "\n")
    return run


@pytest.fixture(scope="module")
def encoder(tiny_base: Path, circles: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny SD's samples, family and frozen parts: what a run hands build_cache."""
    from difftune.config import build_config
    from difftune.data.training import open_training_data
    from difftune.families import get_family

    config = build_config(run_config(tiny_base, circles, tmp_path_factory.mktemp("run") / "run"))
    family = get_family("sd")
    return {"samples": open_training_data(config.data, 0, True), "family": family,
            "parts": family.load(config.model)}


def poison_loss(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    """Make the loss NaN on the given (1-based) calls of the training loss."""
    import difftune.training.stepping as stepping

    real = stepping.training_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in bad_calls else loss

    monkeypatch.setattr(stepping, "training_loss", poisoned)


def pipeline_calls(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[dict[str, Any]]:
    """Every call of a diffusers pipeline class from now on: its steps, guidance, scheduler
    class and timestep spacing (how validation and `difftune generate` sample)."""
    seen: list[dict[str, Any]] = []
    original = cls.__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append({"steps": kwargs.get("num_inference_steps"), "guidance": kwargs.get("guidance_scale"),
                     "scheduler": type(self.scheduler).__name__,
                     "spacing": self.scheduler.config.get("timestep_spacing")})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", spy)
    return seen
