"""Fault suite, class 2: finished work is never lost. final/ is written whole or not at
all, an earlier final/ is kept when a run trains longer, two runs never share a run
directory, a full disk stops before a write, and a bad output path fails before the work."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import copy_run, run_config
from safetensors.torch import load_file

from difftune.cli import main
from difftune.config import build_config, to_toml
from difftune.training.checkpoint import DiskSpaceError, ResumeError
from difftune.training.loop import Run, train
from difftune.training.plan import plan_run

HERE = Path(__file__).parent
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _raw(base: Path, data: Path, out: Path, steps: int = 2) -> dict:
    raw = run_config(base, data, out, train={"max_steps": steps, "checkpoint_every": 1})
    raw["validation"] = {"every": 100}
    return raw


def _same(a: Path, b: Path) -> bool:
    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.slow
def test_a_kill_while_final_is_written_leaves_no_half_final(finished_run, tiny_base, circles, tmp_path) -> None:
    run = tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text(to_toml(build_config(_raw(tiny_base, circles, run))))
    died = subprocess.run([sys.executable, str(HERE / "fault_child.py"), str(config), "kill-during-final", "0"],
                          capture_output=True, text=True, timeout=300)
    assert died.returncode == -signal.SIGKILL
    assert not (run / "final").exists() and (run / ".final.partial").is_dir()
    code = main(["generate", "--controlnet", str(run), "--image", str(circles / "conditioning_images" / "000000.png"),
                 "--prompt", "red", "--out", str(tmp_path / "o.png")])
    assert code == 2  # "has not finished", not a traceback on a half folder
    done = subprocess.run([sys.executable, "-m", "difftune", "train", str(config)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (run / ".final.partial").exists()
    assert _same(run / "final" / WEIGHTS, finished_run / "final" / WEIGHTS)


def test_training_longer_keeps_the_earlier_final(finished_run, tiny_base, circles, tmp_path) -> None:
    run = copy_run(finished_run, tmp_path)
    assert train(build_config(_raw(tiny_base, circles, run, steps=3))) == run / "final"
    assert _same(run / "final-step-000002" / WEIGHTS, finished_run / "final" / WEIGHTS)
    assert not _same(run / "final" / WEIGHTS, finished_run / "final" / WEIGHTS)


def test_a_second_process_on_the_same_run_directory_is_refused(tiny_base, circles, tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from difftune.training.rundir import take_lock; "
        f"take_lock(Path({str(run)!r})); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ResumeError, match=f"in use by another difftune run \\(pid {holder.pid} on"):
            plan_run(build_config(_raw(tiny_base, circles, run)))
    finally:
        holder.kill()
        holder.wait()
    assert plan_run(build_config(_raw(tiny_base, circles, run))).resume_from is None  # free again


def test_a_full_disk_before_final_stops_with_the_checkpoint_kept(monkeypatch, tiny_base, circles, tmp_path) -> None:
    import difftune.training.loop as loop

    real = loop.check_disk_space

    def no_room_for_final(run_dir, needed, step, what=""):
        return "not enough disk space for final/: test" if what == "final/" else real(run_dir, needed, step, what)

    monkeypatch.setattr(loop, "check_disk_space", no_room_for_final)
    out = tmp_path / "run"
    with pytest.raises(DiskSpaceError, match="final/"):
        Run(build_config(_raw(tiny_base, circles, out))).fit()
    assert not (out / "final").exists() and (out / "checkpoints" / "step-000002" / "COMPLETE").is_file()
    monkeypatch.setattr(loop, "check_disk_space", real)
    assert train(build_config(_raw(tiny_base, circles, out))) == out / "final"


def test_a_write_error_in_final_discards_the_staging_folder(monkeypatch, tiny_base, circles, tmp_path) -> None:
    from difftune.methods.controlnet.method import ControlNet

    def disk_full(self, family, parts, trained, out_dir):
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ControlNet, "save", disk_full)
    out = tmp_path / "run"
    with pytest.raises(DiskSpaceError, match="No space left on device"):
        Run(build_config(_raw(tiny_base, circles, out))).fit()
    assert not (out / "final").exists() and not (out / ".final.partial").exists()


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_weights_get_the_users_umask(mask, tiny_base, circles, tmp_path) -> None:
    previous = os.umask(mask)
    try:
        out = tmp_path / "run"
        train(build_config(_raw(tiny_base, circles, out, steps=1)))
    finally:
        os.umask(previous)
    expected = 0o666 & ~mask
    for file in [out / "final" / WEIGHTS, out / "checkpoints" / "step-000001" / "controlnet" / WEIGHTS]:
        assert file.stat().st_mode & 0o777 == expected, oct(file.stat().st_mode)


OUT_CASES = {"a folder": "is a directory", "no image suffix": "must end in one of", "under a file": "is a file"}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_generate_refuses_a_bad_out_before_loading(case, finished_run, circles, tmp_path, capsys) -> None:
    taken = tmp_path / "taken"
    taken.write_text("x")
    out = {"a folder": str(tmp_path), "no image suffix": str(tmp_path / "o.txt"), "under a file": str(taken / "o.png")}
    started = time.perf_counter()
    code = main(["generate", "--controlnet", str(finished_run), "--image",
                 str(circles / "conditioning_images" / "000000.png"), "--prompt", "red", "--out", out[case]])
    error = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "--out" in error and OUT_CASES[case] in error, error
    assert time.perf_counter() - started < 2


@pytest.mark.parametrize("verb", ["lora", "single-file"])
def test_export_refuses_a_bad_out_before_reading(verb, tiny_base, tmp_path, capsys) -> None:
    source = str(tiny_base)
    code = main(["export", verb, source, str(tmp_path / "model.ckpt")])
    error = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "must end in one of .safetensors" in error


def test_export_lora_of_a_controlnet_run_says_what_it_is(finished_run, tmp_path, capsys) -> None:
    code = main(["export", "lora", str(finished_run), str(tmp_path / "k.safetensors")])
    assert code == 2 and "no pytorch_lora_weights.safetensors" in capsys.readouterr().err
