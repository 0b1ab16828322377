"""Fault suite, classes 6 and 7: messages and exit codes, signals, and a new user's first
hour (the start summary, the bar, generate from a run, the report, the README)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_config
from PIL import Image

from difftune.cli import main
from difftune.config import build_config, to_toml
from difftune.training.events import LossWindow, Throughput, read_events
from difftune.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


# --- class 6: messages and exit codes -----------------------------------------------------

SET_CASES = {"=3": "--set =3", "train.=3": "--set train.=3", "train.max_steps": "expected section.key=value",
             "model=3": "--set model=3: model is a section"}


@pytest.mark.parametrize("override", list(SET_CASES))
def test_a_bad_set_names_the_set(override, tiny_base, circles, tmp_path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(to_toml(build_config(run_config(tiny_base, circles, tmp_path / "run"))))
    code = main(["train", str(config), "--set", override])
    error = " ".join(capsys.readouterr().err.split())
    assert code == 2 and SET_CASES[override] in error, error


def test_data_check_exit_codes(circles, tmp_path, capsys) -> None:
    report = str(tmp_path / "r.json")
    assert main(["data", "check", str(circles), "--resolution", "64", "--report", report]) == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    assert main(["data", "check", str(bad), "--report", report]) == 1
    assert main(["data", "check", str(tmp_path / "nowhere"), "--report", report]) == 2
    assert main(["data", "check", str(circles), "--resolution", "100", "--report", report]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_config_typo_is_reported_before_torch_is_imported(tmp_path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text('[model]\npretrained = "x"\n[data]\npath = "d"\n[train]\noutput_dir = "o"\nlerning_rate = 1\n')
    probe = ("import sys, time; t = time.perf_counter(); from difftune.cli import main; "
             f"code = main(['train', {str(config)!r}]); "
             "print(code, 'torch' in sys.modules, 'diffusers' in sys.modules, round(time.perf_counter() - t, 2))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    code, torch_loaded, diffusers_loaded, seconds = done.stdout.split()
    assert (code, torch_loaded, diffusers_loaded) == ("2", "False", "False")
    assert "train.lerning_rate: unknown key" in done.stderr and "Traceback" not in done.stderr
    assert float(seconds) < 2.0


@pytest.mark.slow
def test_a_training_command_prints_no_unrelated_library_warnings(tiny_base, circles, tmp_path) -> None:
    config = tmp_path / "c.toml"
    raw = run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": 1})
    config.write_text(to_toml(build_config(raw)))
    done = subprocess.run([sys.executable, "-m", "difftune", "train", str(config)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for noise in ("kernels-community", "requires torchvision", "FutureWarning", "DeprecationWarning", "Traceback"):
        assert noise not in done.stderr


def _wait_for(events: Path, text: str, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        if events.is_file() and text in events.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text} never appeared in {events}")


def _train_until(raw: dict, tmp_path: Path, text: str) -> subprocess.Popen:
    """`difftune train` in a subprocess, returned once its events.jsonl holds `text`."""
    config = tmp_path / "c.toml"
    config.write_text(to_toml(build_config(raw)))
    process = subprocess.Popen([sys.executable, "-m", "difftune", "train", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(Path(raw["train"]["output_dir"]) / "events.jsonl", text, process)
    return process


@pytest.mark.slow
def test_sigterm_during_the_last_validation_exits_0_with_final_and_report(tiny_base, circles, held_out,
                                                                          tmp_path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", held_out, train={"max_steps": 1})
    raw["validation"] |= {"every": 100, "num_images": 4, "steps": 50, "prompts": ["red circle"] * 8,
                          "images": [str(held_out / "conditioning_images" / "000000.png")] * 8}
    process = _train_until(raw, tmp_path, '"event": "final"')
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-2000:]
    assert (tmp_path / "run" / "final" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "run" / "report.html").is_file() and "Traceback" not in stderr
    stopped = [e for e in read_events(tmp_path / "run") if e["event"] == "stopped"]
    assert stopped and stopped[-1]["during"] == "final validation"
    assert len(list((tmp_path / "run" / "validation" / "step-000001").glob("pair-*-grid.png"))) < 8


@pytest.mark.slow
def test_ctrl_c_stops_after_a_checkpoint_and_exits_130(tiny_base, circles, tmp_path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": 2000, "checkpoint_every": 5000})
    process = _train_until(raw, tmp_path, '"event": "step"')
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert "stopped early; run the same command again" in stderr and "None" not in stderr
    assert list((tmp_path / "run" / "checkpoints").glob("step-*/COMPLETE"))


def test_a_second_ctrl_c_stops_at_once_and_exits_130(monkeypatch, tmp_path, capsys) -> None:
    from difftune import cli
    from difftune.signals import StopSignals

    with StopSignals() as stop:
        stop._handle(signal.SIGINT, None)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["train"].set_defaults(run=interrupted)
    assert cli.main(["train", str(tmp_path / "c.toml")]) == 130
    error = capsys.readouterr().err
    assert "interrupted" in error and "Traceback" not in error


# --- class 7: the first hour ----------------------------------------------------------------


def test_the_start_summary_says_where_what_how_long_and_where_to_watch(finished_run) -> None:
    start = next(e for e in read_events(finished_run) if e["event"] == "start")
    text = "\n".join(start["summary"])
    for expected in (f"run: {finished_run}", "trainable parameters", "12 samples", "steps: 0 -> 2", "report.html"):
        assert expected in text, text


@pytest.mark.parametrize(("batch", "accumulation"), [(16, 1), (4, 4)])
def test_a_dataset_smaller_than_a_step_says_so(batch, accumulation, tiny_base, circles, tmp_path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run",
                     train={"max_steps": 1, "batch_size": batch, "gradient_accumulation_steps": accumulation})
    raw["validation"] = {"every": 100}
    train(build_config(raw))
    start = next(e for e in read_events(tmp_path / "run") if e["event"] == "start")
    assert any("12 sample(s), fewer than one step's 16" in line for line in start["summary"])


def test_aspect_buckets_smaller_than_a_batch_say_so(tiny_base, tmp_path) -> None:
    from test_buckets import _three_shapes  # 12 images, 4 of each of three shapes

    raw = run_config(tiny_base, _three_shapes(tmp_path / "shapes"), tmp_path / "run", method={"kind": "full"},
                     data={"buckets": True, "bucket_step": 16}, train={"max_steps": 1, "batch_size": 6})
    raw["validation"] = {"every": 100}
    train(build_config(raw))
    start = next(e for e in read_events(tmp_path / "run") if e["event"] == "start")
    assert any("3 of 3 aspect bucket(s)" in line and "fewer samples than one batch of 6" in line
               for line in start["summary"]), start["summary"]


def test_the_bar_shows_a_mean_loss_and_a_steady_time_left() -> None:
    window = LossWindow(size=3)
    assert [round(window.add(v), 3) for v in (1.0, 3.0, float("nan"), 5.0, 7.0)] == [1.0, 2.0, 2.0, 3.0, 5.0]
    clock = Throughput()
    for _ in range(5):
        time.sleep(0.01)
        clock.update(2)
    before = clock.eta(100)
    time.sleep(0.2)  # a validation: a pause, not a step
    clock.restart()
    time.sleep(0.01)
    clock.update(2)
    assert 0.5 < clock.eta(99) / before < 2.0  # an unsmoothed rate would read the pause as a 10x slower step


def test_generate_from_a_run_takes_its_base_size_and_guidance(finished_run, circles, tmp_path, capsys) -> None:
    control = tmp_path / "big.png"
    Image.open(circles / "conditioning_images" / "000000.png").resize((128, 128)).save(control)
    out = tmp_path / "o.png"
    code = main(["generate", "--controlnet", str(finished_run), "--image", str(control), "--prompt",
                 "red circle with blue background", "--steps", "2", "--out", str(out)])
    error = capsys.readouterr().err
    assert code == 0, error
    assert Image.open(out).size == (64, 64)  # the run's data.resolution, not the 128 px control image
    assert "resolution 64 (from the run)" in error and "guidance scale 7.5 (from the run)" in error
    assert "base " in error


def test_report_shows_run_facts_prompts_ticks_and_curves(tiny_base, circles, held_out, tmp_path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", held_out, train={"max_steps": 2})
    train(build_config(raw))
    page = (tmp_path / "run" / "report.html").read_text()
    for expected in ("method: controlnet; base:", "started at step 0 of 2", "final/ written at step 2",
                     "learning rate", "throughput", "red circle with blue background", ">step<"):
        assert expected in page, expected
    assert len(re.findall(r'text-anchor="end">[-0-9.e]+</text>', page)) >= 6  # y-axis tick labels
    prompts = json.loads((tmp_path / "run" / "validation" / "step-000002" / "prompts.json").read_text())
    assert prompts["pair-00"]["prompt"] == "red circle with blue background"


def test_readme_shows_the_first_steps() -> None:
    readme = (ROOT / "README.md").read_text()
    for expected in ("Python 3.11", "python3 -m venv", "git clone", "tensorboard --logdir",
                     "pip install -c constraints.txt"):
        assert expected in readme
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_a_bad_dataset_is_reported_before_torch_is_imported(tmp_path, tiny_base) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(data / name)
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n{"file_name": "b.png", "text": 5}\n')
    raw = run_config(tiny_base, data, tmp_path / "run", method={"kind": "lora"})
    config = tmp_path / "c.toml"
    config.write_text(to_toml(build_config(raw)))
    probe = ("import sys; from difftune.cli import main; "
             f"code = main(['train', {str(config)!r}]); print(code, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["2", "False"], done.stderr[-2000:]
    assert "line 2: 'text' is a number" in done.stderr


@pytest.mark.parametrize("kind", ["controlnet", "lora", "full", "dreambooth"])
def test_what_the_config_says_a_method_reads_is_what_the_method_reads(kind, tiny_base, circles, tmp_path) -> None:
    from difftune.methods import make_method

    method = {"kind": kind}
    if kind == "dreambooth":
        method["dreambooth"] = {"instance_prompt": "a photo of sks dog"}
    config = build_config(run_config(tiny_base, circles, tmp_path / "run", method=method)).method
    built = make_method(config)
    assert (config.needs_conditioning, config.fixed_caption) == (built.needs_conditioning, built.fixed_caption)


TYPOS = {"train.lerning_rate": "did you mean learning_rate?", "max_steps": "did you mean train.max_steps?",
         "method.lora.rnak": "did you mean rank?", "validaton.every": "did you mean validation?"}


@pytest.mark.parametrize("typo", list(TYPOS))
def test_a_misspelt_key_gets_a_suggestion(typo, tiny_base, circles, tmp_path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(to_toml(build_config(run_config(tiny_base, circles, tmp_path / "run", method={"kind": "lora"}))))
    assert main(["train", str(config), "--set", f"{typo}=3"]) == 2
    assert TYPOS[typo] in capsys.readouterr().err
