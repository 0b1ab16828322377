"""A checkpoint may come from anywhere (a download, a shared disk): resuming from it must
never run code. Its EMA is safetensors plus JSON, the only pickle it may hold is
accelerate's RNG state (read with torch's restricted unpickler), and any other pickle is
refused without being read."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file

from difftune.config import build_config
from difftune.files import crc32
from difftune.training.checkpoint import MANIFEST, ResumeError, verify_checkpoint
from difftune.training.loop import Run, train


class _Payload:
    """Unpickling this makes a folder: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _ema_config(base: Path, data_dir: Path, out: Path, **train_keys):
    raw = run_config(base, data_dir, out, method={"kind": "full", "ema": {"decay": 0.5}},
                     train={"max_steps": 2, "checkpoint_every": 1, **train_keys})
    raw["validation"] = {"every": 100}
    return build_config(raw)


@pytest.fixture(scope="module")
def ema_run(tiny_base: Path, circles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ema") / "run"
    train(_ema_config(tiny_base, circles, out))
    return out


def _resumable_copy(run: Path, where: Path) -> Path:
    """The run as if stopped after its step-1 checkpoint."""
    target = where / "run"
    shutil.copytree(run, target)
    shutil.rmtree(target / "final")
    shutil.rmtree(target / "checkpoints" / "step-000002")
    events = [line for line in (target / "events.jsonl").read_text().splitlines() if '"event": "final"' not in line]
    (target / "events.jsonl").write_text("\n".join(events) + "\n")
    return target


def _plant(checkpoint: Path, name: str, marker: Path) -> None:
    """A crafted pickle as `name`, with the manifest rewritten to match: whoever crafts a
    checkpoint can craft its checksums too."""
    (checkpoint / name).write_bytes(pickle.dumps(_Payload(marker)))
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][name] = {"bytes": (checkpoint / name).stat().st_size, "crc32": crc32(checkpoint / name)}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_an_ema_checkpoint_holds_no_pickle_but_the_rng_state(ema_run: Path) -> None:
    checkpoint = ema_run / "checkpoints" / "step-000001"
    pickles = sorted(p.name for p in checkpoint.rglob("*.pkl"))
    assert pickles == ["random_states_0.pkl"]
    average = load_file(checkpoint / "ema.safetensors")
    assert len(average) > 0 and all(torch.isfinite(t).all() for t in average.values())


def test_an_ema_run_resumes_to_the_same_average(ema_run: Path, tiny_base: Path, circles: Path,
                                                tmp_path: Path) -> None:
    run = _resumable_copy(ema_run, tmp_path)
    final = train(_ema_config(tiny_base, circles, run))
    name = "unet/diffusion_pytorch_model.safetensors"
    expected, resumed = load_file(ema_run / "final" / name), load_file(final / name)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


# custom_checkpoint_0.pkl is what accelerate's register_for_checkpointing writes and reads
# with weights_only=False (difftune kept its EMA there before); the others are files
# accelerate reads with weights_only=True, replaced by a crafted pickle.
PLANTED = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"]


@pytest.mark.parametrize("name", PLANTED)
def test_a_crafted_pickle_in_a_checkpoint_runs_no_code(name: str, ema_run: Path, tiny_base: Path, circles: Path,
                                                       tmp_path: Path) -> None:
    run = _resumable_copy(ema_run, tmp_path)
    checkpoint = run / "checkpoints" / "step-000001"
    marker = tmp_path / "code-ran"
    _plant(checkpoint, name, marker)
    with pytest.raises(ResumeError) as refused:
        Run(_ema_config(tiny_base, circles, run, resume=str(checkpoint))).fit()
    assert not marker.exists()
    if name.startswith("custom"):
        assert verify_checkpoint(checkpoint) is not None
        assert name in str(refused.value) and "pickle" in str(refused.value)
    else:
        assert "cannot be restored" in str(refused.value)
