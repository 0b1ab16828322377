"""Fault suite, cases first found from outside (an adversarial pass over the CLI): each was
a traceback, a silent wrong result or lost work, and is now a message or the right result."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_run, run_config
from PIL import Image

from difftune.cli import main
from difftune.config import build_config, to_toml
from difftune.training.checkpoint import ResumeError
from difftune.training.events import read_events
from difftune.training.loop import train
from difftune.training.plan import plan_run


def _raw(base: Path, data_dir: Path, out: Path, steps: int = 2, **sections) -> dict:
    raw = run_config(base, data_dir, out, train={"max_steps": steps, "checkpoint_every": 1}, **sections)
    raw["validation"] = {"every": 100}
    return raw


def _cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    error = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in error
    return code, error


def _write(tmp_path: Path, raw: dict) -> str:
    config = tmp_path / "c.toml"
    config.write_text(to_toml(build_config(raw)))
    return str(config)


# --- class 2: nothing of the user's is lost -------------------------------------------------


def test_an_output_dir_holding_the_users_files_is_refused_and_left_alone(tiny_base, circles, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "final").mkdir(parents=True)
    (out / "final" / "important.txt").write_text("precious")
    code, error = _cli(["train", _write(tmp_path, _raw(tiny_base, circles, out))], capsys)
    assert code == 2 and "holds files that are not a difftune run (final)" in error
    assert (out / "final" / "important.txt").read_text() == "precious" and sorted(os.listdir(out)) == ["final"]


@pytest.mark.parametrize("case", ["not empty", "a file", "n 0", "resolution 100000"])
def test_fill_circles_never_overwrites_and_refuses_absurd_sizes(case, circles, tmp_path, capsys):
    out = {"not empty": str(shutil.copytree(circles, tmp_path / "data")), "a file": str(tmp_path / "f")}.get(
        case, str(tmp_path / "new"))
    (tmp_path / "f").write_text("x")
    flags = {"n 0": ["--n", "0"], "resolution 100000": ["--resolution", "100000"]}.get(case, [])
    before = (tmp_path / "data" / "metadata.jsonl").read_text() if case == "not empty" else None
    code, error = _cli(["data", "fill-circles", out, *flags], capsys)
    assert code == 2, error
    if before is not None:
        assert (tmp_path / "data" / "metadata.jsonl").read_text() == before


def test_a_damaged_line_in_events_jsonl_does_not_stop_the_run(finished_run, tiny_base, circles, tmp_path):
    run = copy_run(finished_run, tmp_path)
    with open(run / "events.jsonl", "ab") as events:
        events.write(b'{"event": "step", "ti\n\xff\xfe not json\n')
    assert train(build_config(_raw(tiny_base, circles, run, steps=3))) == run / "final"
    assert [e["step"] for e in read_events(run) if e["event"] == "final"] == [2, 3]


def test_resuming_on_changed_data_is_refused(tiny_base, circles, tmp_path):
    data = shutil.copytree(circles, tmp_path / "data")
    run = tmp_path / "run"
    train(build_config(_raw(tiny_base, data, run)))
    shutil.rmtree(run / "final")  # as if killed before final/
    plan_run(build_config(_raw(tiny_base, data, run, steps=3)))  # the same data: fine
    lines = (data / "metadata.jsonl").read_text().splitlines()
    (data / "metadata.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # one row fewer
    with pytest.raises(ResumeError, match="the training data changed since step-000002: 12 rows .* 11 now"):
        plan_run(build_config(_raw(tiny_base, data, run, steps=3)))


# --- class 4: paths of every kind ----------------------------------------------------------


def _odd_run_dir(case: str, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    if case == "broken link":
        out.symlink_to(tmp_path / "nowhere")
    elif case == "lock is a folder":
        (out / ".lock").mkdir(parents=True)
    elif case == "checkpoints is a file":
        out.mkdir()
        (out / "events.jsonl").write_text("")
        (out / "checkpoints").write_text("x")
    return out


ODD = {"broken link": "is a symbolic link to", "lock is a folder": "not a difftune run (.lock)",
       "checkpoints is a file": "checkpoints should be a folder"}


@pytest.mark.parametrize("case", list(ODD))
def test_an_odd_run_directory_is_named_before_anything_runs(case, tiny_base, circles, tmp_path, capsys):
    out = _odd_run_dir(case, tmp_path)
    code, error = _cli(["train", _write(tmp_path, _raw(tiny_base, circles, out))], capsys)
    assert code == 2 and ODD[case] in error, error


def test_an_output_dir_inside_the_data_is_refused(tiny_base, circles, tmp_path, capsys):
    data = shutil.copytree(circles, tmp_path / "data")
    code, error = _cli(["train", _write(tmp_path, _raw(tiny_base, data, data / "run"))], capsys)
    assert code == 2 and "is inside data.path" in error and not (data / "run").exists()


@pytest.mark.parametrize("case", ["not utf-8", "a folder"])
def test_a_config_that_is_not_text_is_named(case, tmp_path, capsys):
    config = tmp_path / "c.toml"
    if case == "not utf-8":
        config.write_bytes(b"\xff\xfe[model]\n")
    else:
        config.mkdir()
    code, error = _cli(["train", str(config)], capsys)
    assert code == 2 and {"not utf-8": "not UTF-8 text", "a folder": "a folder, not a config file"}[case] in error


def test_a_config_with_a_byte_order_mark_is_read(tiny_base, circles, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xef\xbb\xbf" + to_toml(build_config(_raw(tiny_base, circles, tmp_path / "run", 1))).encode())
    assert _cli(["train", str(config)], capsys)[0] == 0


def _lora_source(case: str, tmp_path: Path) -> str:
    from safetensors.numpy import save_file

    path = tmp_path / "x.safetensors"
    if case == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif case == "no lora keys":
        save_file({"foo.weight": np.zeros(2, np.float32)}, str(path))
    else:
        return str(tmp_path / "missing.safetensors")
    return str(path)


LORA = {"garbage": "is not a safetensors file", "no lora keys": "holds no LoRA weights",
        "missing file": "no such file or folder"}


@pytest.mark.parametrize("case", list(LORA))
@pytest.mark.parametrize("verb", ["generate", "export"])
def test_a_bad_lora_file_is_named_before_loading(case, verb, tiny_base, tmp_path, capsys):
    source = _lora_source(case, tmp_path)
    args = (["generate", "--base", str(tiny_base), "--lora", source, "--prompt", "x", "--out", str(tmp_path / "o.png")]
            if verb == "generate" else ["export", "lora", source, str(tmp_path / "k.safetensors")])
    code, error = _cli(args, capsys)
    assert code == 2 and LORA[case] in error, error


# --- class 5: what was silently wrong ------------------------------------------------------


def test_a_symlinked_data_folder_is_not_outside_itself(tiny_base, circles, tmp_path, capsys):
    link = tmp_path / "data-link"
    link.symlink_to(circles)
    assert _cli(["data", "check", str(link), "--resolution", "64", "--report", str(tmp_path / "r.json")],
                capsys)[0] == 0


def test_home_and_relative_paths_are_recorded_absolute(tiny_base, circles, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_base, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    raw = _raw(Path("base"), circles, Path("~/runs/a"), 1)
    assert _cli(["train", _write(tmp_path, raw)], capsys)[0] == 0
    recorded = (tmp_path / "runs" / "a" / "config.toml").read_text()
    assert f'pretrained = "{tmp_path / "base"}"' in recorded and f'output_dir = "{tmp_path / "runs" / "a"}"' in recorded
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # generate finds the run's base from anywhere
    code, error = _cli(["generate", "--controlnet", "~/runs/a", "--image",
                        str(circles / "conditioning_images" / "000000.png"), "--prompt", "red", "--steps", "1",
                        "--out", "o.png"], capsys)
    assert code == 0 and (elsewhere / "o.png").is_file(), error


def test_sixteen_bit_greyscale_does_not_depend_on_its_brightest_pixel():
    from difftune.data.sources import to_rgb

    dark = np.full((4, 4), 200 * 257, np.uint16)
    brighter = dark.copy()
    brighter[0, 0] = 60000
    values = [np.asarray(to_rgb(Image.fromarray(a)))[1, 1, 0] for a in (dark, brighter)]
    assert values == [200, 200]


@pytest.mark.parametrize(("section", "values", "expected"), [
    ("validation", {"metric": "canny", "metric_data": "x"}, "takes none"),
    ("train", {"max_steps": 10**12}, "less than or equal to 1000000000"),
])
def test_more_settings_that_make_no_sense(section, values, expected, tiny_base, circles, tmp_path, capsys):
    raw = _raw(tiny_base, circles, tmp_path / "run", method={"kind": "lora"})
    raw[section] = {**raw.get(section, {}), **values}
    config = tmp_path / "c.toml"
    config.write_text("\n".join(f"[{s}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in vs.items())
                                for s, vs in raw.items()) + "\n")
    code, error = _cli(["train", str(config)], capsys)
    assert code == 2 and expected in error, error


# --- class 6: messages ---------------------------------------------------------------------


def test_data_check_names_a_file_source_and_a_flag_it_would_ignore(tiny_base, circles, tmp_path, capsys):
    code, error = _cli(["data", "check", str(circles / "images" / "000000.png")], capsys)
    assert code == 2 and "is a file: give a dataset folder" in error
    config = _write(tmp_path, _raw(tiny_base, circles, tmp_path / "run"))
    code, error = _cli(["data", "check", config, "--resolution", "32"], capsys)
    assert code == 2 and "--resolution: only for a dataset path" in error


def test_generate_names_a_missing_controlnet_before_asking_for_a_base(circles, tmp_path, capsys):
    code, error = _cli(["generate", "--controlnet", str(tmp_path / "nope"), "--image",
                        str(circles / "conditioning_images" / "000000.png"), "--prompt", "x",
                        "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "--controlnet" in error and "no such folder" in error


@pytest.mark.slow
def test_sigterm_while_the_models_load_exits_0_without_a_trace(tiny_base, circles, tmp_path):
    config = _write(tmp_path, _raw(tiny_base, circles, tmp_path / "run", 500))
    process = subprocess.Popen([sys.executable, "-m", "difftune", "train", config],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "run" / ".lock").exists() and process.poll() is None:
        pass  # the plan is done; torch and the models are loading now
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    stopped = [e for e in read_events(tmp_path / "run") if e["event"] == "stopped"]
    assert stopped and stopped[0]["during"] == "setup" and stopped[0]["step"] == 0


def test_dreambooth_class_folder_junk_is_named_before_anything_is_generated(tiny_base, circles, tmp_path, capsys):
    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "00000-abc.png").write_bytes(b"not a png")
    method = {"kind": "dreambooth", "dreambooth": {"instance_prompt": "a red circle", "prior_preservation": True,
                                                   "class_data": str(classes), "class_prompt": "a circle",
                                                   "num_class_images": 4}}
    code, error = _cli(["train", _write(tmp_path, _raw(tiny_base, circles, tmp_path / "run", method=method))], capsys)
    assert code == 2 and "00000-abc.png" in error and "not readable images" in error
    assert sorted(os.listdir(classes)) == ["00000-abc.png"]


# --- found by the second pass ----------------------------------------------------------------


def test_class_data_overlapping_the_instance_data_is_refused(tiny_base, circles, tmp_path, capsys):
    data = shutil.copytree(circles, tmp_path / "data")
    before = sorted(os.listdir(data / "images"))
    method = {"kind": "dreambooth", "dreambooth": {"instance_prompt": "a red circle", "prior_preservation": True,
                                                   "class_data": str(data), "class_prompt": "a circle"}}
    code, error = _cli(["train", _write(tmp_path, _raw(tiny_base, data, tmp_path / "run", method=method))], capsys)
    assert code == 2 and "overlap" in error and sorted(os.listdir(data / "images")) == before


OVERWRITES = ["data check report", "export single-file", "export lora", "generate over its image"]


@pytest.mark.parametrize("case", OVERWRITES)
def test_an_output_that_would_write_over_an_input_is_refused(case, finished_run, tiny_base, circles, tmp_path,
                                                              capsys):
    data = shutil.copytree(circles, tmp_path / "data")
    image = data / "conditioning_images" / "000000.png"
    base = shutil.copytree(tiny_base, tmp_path / "base")
    lora = tmp_path / "lora.safetensors"
    from safetensors.numpy import save_file

    save_file({"unet.down.lora_A.weight": np.zeros((2, 2), np.float32)}, str(lora))
    args = {
        "data check report": ["data", "check", str(data), "--report", str(data / "state.json")],
        "export single-file": ["export", "single-file", str(base), str(base / "unet" / "diffusion_pytorch_model.safetensors")],
        "export lora": ["export", "lora", str(lora), str(lora), "--format", "diffusers"],
        "generate over its image": ["generate", "--controlnet", str(finished_run), "--image", str(image), "--prompt", "x",
                                    "--out", str(image)],
    }[case]
    before = {p: p.stat().st_mtime_ns for p in (image, lora, base / "unet" / "diffusion_pytorch_model.safetensors")}
    code, error = _cli(args, capsys)
    refusals = ("would write over", "exists; give --overwrite", "inside the model folder")
    assert code == 2 and any(refusal in error for refusal in refusals), error
    assert before == {p: p.stat().st_mtime_ns for p in before}
    assert not (data / "state.json").exists()


def test_a_checkpoints_adapter_file_is_not_silently_ignored(tiny_base, circles, tmp_path, capsys):
    run = tmp_path / "run"
    train(build_config(_raw(tiny_base, circles, run, method={"kind": "lora"})))
    adapter = run / "checkpoints" / "step-000002" / "unet" / "adapter_model.safetensors"
    code, error = _cli(["generate", "--base", str(tiny_base), "--lora", str(adapter), "--prompt", "x",
                        "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "without the component prefix" in error and not (tmp_path / "o.png").exists()


def test_an_existing_final_is_kept_when_the_events_no_longer_say_its_step(finished_run, tiny_base, circles, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (run / "events.jsonl").unlink()
    shutil.rmtree(run / "checkpoints" / "step-000002")  # what a checkpoints_total_limit might have pruned
    train(build_config(_raw(tiny_base, circles, run, steps=3)))
    kept = list(run.glob("final-replaced-*"))
    assert len(kept) == 1 and (kept[0] / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("key", ["class_data", "encoded_cache_dir"])
def test_an_unwritable_folder_the_run_writes_is_named_before_models_load(key, tiny_base, circles, tmp_path, capsys):
    if key == "class_data":
        raw = _raw(tiny_base, circles, tmp_path / "run", method={
            "kind": "dreambooth", "dreambooth": {"instance_prompt": "a red circle", "prior_preservation": True,
                                                 "class_data": "/proc/difftune-classes", "class_prompt": "a circle"}})
    else:
        raw = _raw(tiny_base, circles, tmp_path / "run", data={
            "resolution": 64, "cache_latents": True, "encoded_cache_dir": "/proc/difftune-cache"})
    code, error = _cli(["train", _write(tmp_path, raw)], capsys)
    assert code == 2 and "cannot write in /proc" in error and not (tmp_path / "run").exists()


def test_a_run_inside_another_run_and_an_empty_resume_are_refused(finished_run, tiny_base, circles, tmp_path, capsys):
    code, error = _cli(["train", _write(tmp_path, _raw(tiny_base, circles, finished_run / "nested"))], capsys)
    assert code == 2 and "is inside the run directory" in error
    config = Path(_write(tmp_path, _raw(tiny_base, circles, tmp_path / "run")))
    config.write_text(config.read_text().replace("[train]\n", '[train]\nresume = ""\n'))
    code, error = _cli(["train", str(config)], capsys)
    assert code == 2 and "train.resume: must not be empty" in error


def test_demo_output_dir_expands_home_and_refuses_empty(tmp_path, monkeypatch, capsys):
    from difftune.demo import demo_config

    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo_config("~/d", []).train.output_dir == str(tmp_path / "d")
    assert _cli(["demo", "--output-dir", ""], capsys)[0] == 2


def test_a_stop_request_reaches_long_setup_work():
    from difftune.signals import StopSignals, stop_requested

    assert not stop_requested()
    with StopSignals() as stop:
        assert not stop_requested()
        stop._handle(signal.SIGTERM, None)
        assert stop_requested()
    assert not stop_requested()


@pytest.mark.parametrize("verb", ["generate", "export"])
def test_an_existing_output_is_replaced_only_with_overwrite(verb, finished_run, tiny_base, circles, tmp_path, capsys):
    out = tmp_path / ("o.png" if verb == "generate" else "sd.safetensors")
    out.write_bytes(b"the user's file")
    args = (["generate", "--controlnet", str(finished_run), "--image", str(circles / "conditioning_images" / "000000.png"),
             "--prompt", "x", "--steps", "1", "--out", str(out)] if verb == "generate"
            else ["export", "single-file", str(tiny_base), str(out)])
    code, error = _cli(args, capsys)
    assert code == 2 and "exists; give --overwrite" in error and out.read_bytes() == b"the user's file"
    assert _cli([*args, "--overwrite"], capsys)[0] == 0 and out.read_bytes() != b"the user's file"


def test_export_into_another_models_folder_is_refused(finished_run, tiny_base, tmp_path, capsys):
    base = shutil.copytree(tiny_base, tmp_path / "base")
    code, error = _cli(["export", "single-file", str(tiny_base), str(base / "unet" / "new.safetensors")], capsys)
    assert code == 2 and "inside the model folder" in error and not (base / "unet" / "new.safetensors").exists()


def test_another_tools_output_folder_is_not_taken_for_a_run(tiny_base, circles, tmp_path, capsys):
    out = tmp_path / "lightning"
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.toml").write_text("lightning = 1\n")
    code, error = _cli(["train", _write(tmp_path, _raw(tiny_base, circles, out))], capsys)
    assert code == 2 and "not a difftune run" in error and (out / "config.toml").read_text() == "lightning = 1\n"


def test_a_home_folder_of_dotfiles_is_not_an_empty_output_dir(tiny_base, circles, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("x")
    code, error = _cli(["train", _write(tmp_path, _raw(tiny_base, circles, home))], capsys)
    assert code == 2 and "not a difftune run (.bashrc)" in error


def test_class_data_that_does_not_exist_yet_inside_the_data_is_refused(tiny_base, circles, tmp_path, capsys):
    data = shutil.copytree(circles, tmp_path / "data")
    method = {"kind": "dreambooth", "dreambooth": {"instance_prompt": "a red circle", "prior_preservation": True,
                                                   "class_data": str(data / "classes"), "class_prompt": "a circle"}}
    code, error = _cli(["train", _write(tmp_path, _raw(tiny_base, data, tmp_path / "run", method=method))], capsys)
    assert code == 2 and "overlap" in error and not (data / "classes").exists()


def test_a_run_given_to_the_wrong_flag_says_which_flag_takes_it(finished_run, circles, tmp_path, capsys):
    code, error = _cli(["generate", "--lora", str(finished_run), "--prompt", "x", "--out", str(tmp_path / "o.png")],
                       capsys)
    assert code == 2 and "this run made a ControlNet; give it as --controlnet" in error


def test_a_weight_file_that_does_not_match_its_config_is_named(tiny_base, circles, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base = shutil.copytree(tiny_base, tmp_path / "base")
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.startswith("conv_in.")}, weights)
    code, error = _cli(["generate", "--base", str(base), "--prompt", "x", "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "unet has no weights for 2 parameter(s) (conv_in.weight, conv_in.bias)" in error
    code, error = _cli(["train", _write(tmp_path, _raw(base, circles, tmp_path / "run"))], capsys)
    assert code == 2 and "unet has no weights for 2 parameter(s)" in error
