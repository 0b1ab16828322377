"""Fault suite, classes 4 and 5: bad paths, files and numbers get a sentence and exit 2,
never a traceback and never a silent wrong result; all before any model loads.

Every case runs the CLI in this process (`main([...])`) and checks the exit code, that
the message names the key or flag, and that nothing was created that should not be.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_config
from PIL import Image

from difftune.cli import main


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value) if not isinstance(value, float) or value == value and abs(value) != float("inf") else (
        "nan" if value != value else ("inf" if value > 0 else "-inf"))


def write_config(path: Path, raw: dict) -> Path:
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items() if not isinstance(value, dict)]
        for key, value in values.items():
            if isinstance(value, dict):
                lines.append(f"[{section}.{key}]")
                lines += [f"{k} = {_toml(v)}" for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(tmp_path: Path, raw: dict, capsys) -> tuple[int, str]:
    code = main(["train", str(write_config(tmp_path / "run.toml", raw))])
    error = capsys.readouterr().err
    assert "Traceback" not in error
    return code, " ".join(error.split())


def _fast(base: Path, data: Path, out: Path, **sections) -> dict:
    raw = run_config(base, data, out, **sections)
    raw["validation"] = {"every": 100}
    return raw


# --- class 4: model, tokenizer and ControlNet paths ---------------------------------------


def _model_cases(tiny_base: Path, circles: Path, tmp_path: Path) -> dict[str, tuple[str, str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    broken = shutil.copytree(tiny_base, tmp_path / "broken")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    return {
        "missing": (str(tmp_path / "nowhere"), "no such folder"),
        "empty": (str(empty), "an empty folder"),
        "data folder": (str(circles), "a dataset folder"),
        "subfolder": (str(tiny_base / "unet"), "a single model folder"),
        "a file": (str(afile), "a file, not a folder"),
        "hub id offline": ("someone/no-such-model", "not in the local Hub cache"),
        "missing weights": (str(broken), "vae/: no weights"),
        "blank": ("  ", "must not be empty"),
    }


MODEL_CASES = ["missing", "empty", "data folder", "subfolder", "a file", "hub id offline", "missing weights", "blank"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_pretrained_is_named_before_the_run_directory_exists(case, tiny_base, circles, tmp_path, capsys):
    value, expected = _model_cases(tiny_base, circles, tmp_path)[case]
    raw = _fast(tiny_base, circles, tmp_path / "run")
    raw["model"]["pretrained"] = value
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and "model.pretrained" in error and expected in error, error
    assert not (tmp_path / "run").exists()


TOKENIZER_CASES = {"missing": "no such folder", "pipeline": "did you mean", "data": "no tokenizer files"}


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_bad_model_tokenizer_is_named(case, tiny_base, circles, tmp_path, capsys):
    value = {"missing": str(tmp_path / "nope"), "pipeline": str(tiny_base), "data": str(circles)}[case]
    raw = _fast(tiny_base, circles, tmp_path / "run")
    raw["model"]["tokenizer"] = value
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and "model.tokenizer" in error and TOKENIZER_CASES[case] in error, error
    assert not (tmp_path / "run").exists()


CONTROLNET_CASES = {"missing": "no such folder", "data": "a dataset folder", "unet": "holds a UNet2DConditionModel"}


@pytest.mark.parametrize("case", list(CONTROLNET_CASES))
def test_bad_method_controlnet_is_named(case, tiny_base, circles, tmp_path, capsys):
    value = {"missing": str(tmp_path / "nope"), "data": str(circles), "unet": str(tiny_base / "unet")}[case]
    raw = _fast(tiny_base, circles, tmp_path / "run", method={"kind": "controlnet", "controlnet": value})
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and "method.controlnet" in error and CONTROLNET_CASES[case] in error, error


# --- class 4: output directory, data path, precision, hub ---------------------------------


def _output_dir(case: str, tmp_path: Path) -> str:
    afile = tmp_path / "taken"
    afile.write_text("x")
    return {"a file": str(afile), "under a file": str(afile / "run"), "read-only": "/proc/difftune-run",
            "empty": " "}[case]


OUTPUT_CASES = {"a file": "is a file, not a directory", "under a file": "is a file, so nothing can be made",
                "read-only": "cannot write in /proc", "empty": "must not be empty"}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_bad_output_dir_is_named(case, tiny_base, circles, tmp_path, capsys):
    raw = _fast(tiny_base, circles, tmp_path / "unused")
    raw["train"]["output_dir"] = _output_dir(case, tmp_path)  # as written: Path("") would read "."
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and "train.output_dir" in error and OUTPUT_CASES[case] in error, error


def _dataset(case: str, tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(folder / "images" / "a.png")
    lines = {
        "empty metadata": [],
        "escaping file_name": ['{"file_name": "images/a.png", "text": "a"}', '{"file_name": "../../x.png", "text": "b"}'],
        "a bad caption cell": ['{"file_name": "images/a.png", "text": "a"}', '{"file_name": "images/a.png", "text": 5}'],
        "non-utf8 metadata": [],
    }.get(case)
    if lines is not None:
        (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    if case == "non-utf8 metadata":
        (folder / "metadata.jsonl").write_bytes(b'{"file_name": "images/a.png", "text": "caf\xe9"}\n')
    if case == "zero-row parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        shutil.rmtree(folder / "images")
        pq.write_table(pa.table({"image": pa.array([], pa.binary()), "text": pa.array([], pa.string())}),
                       folder / "train.parquet")
    if case == "non-utf8 caption file":
        (folder / "images" / "a.txt").write_bytes(b"caf\xe9")
    return folder


DATA_CASES = {"empty metadata": "the file is empty", "escaping file_name": "points outside the dataset folder",
              "a bad caption cell": "line 2: 'text' is a number", "non-utf8 metadata": "line 1 is not UTF-8",
              "zero-row parquet": "the file has no rows", "non-utf8 caption file": "a.txt is not UTF-8 text"}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_unopenable_data_is_explained_by_file_and_line(case, tiny_base, tmp_path, capsys):
    raw = _fast(tiny_base, _dataset(case, tmp_path), tmp_path / "run", method={"kind": "lora"})
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and DATA_CASES[case] in error, error


def test_empty_data_path_and_missing_data_folder(tiny_base, tmp_path, capsys):
    raw = _fast(tiny_base, tmp_path / "nowhere", tmp_path / "run")
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and "data.path" in error and "no such folder or file" in error
    raw["data"]["path"] = ""
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and "data.path: must not be empty" in error


def test_fp16_on_the_cpu_is_refused_before_models_load(tiny_base, circles, tmp_path, capsys):
    raw = _fast(tiny_base, circles, tmp_path / "run", train={"mixed_precision": "fp16"})
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and 'mixed_precision = "fp16" needs a GPU' in error


def test_hub_push_while_offline_is_refused_before_training(tiny_base, circles, tmp_path, capsys):
    raw = _fast(tiny_base, circles, tmp_path / "run")
    raw["hub"] = {"push": True}
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and "hub.push = true, but the Hub cannot be reached" in error
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- class 5: numbers and settings that make no sense -------------------------------------

NONSENSE = [
    ("train", "learning_rate", float("inf"), "finite number"),
    ("train", "learning_rate", float("nan"), "finite number"),
    ("train", "learning_rate", 5.0, "less than or equal to 1"),
    ("validation", "guidance_scale", float("inf"), "finite number"),
    ("validation", "steps", 0, "greater than 0"),
    ("validation", "seed", -1, "greater than or equal to 0"),
    ("objective", "noise_offset", 5.0, "less than or equal to 1"),
    ("data", "resolution", 16384, "less than or equal to 8192"),
    ("train", "tracker_project_name", "../outside", "letters, digits"),
    ("train", "tracker_project_name", "a/b", "letters, digits"),
    ("train", "batch_size", 0, "greater than 0"),
    ("train", "adam_weight_decay", float("-inf"), "finite number"),
]


@pytest.mark.parametrize(("section", "key", "value", "expected"), NONSENSE,
                         ids=[f"{s}.{k}={v}" for s, k, v, _ in NONSENSE])
def test_absurd_numbers_are_config_errors(section, key, value, expected, tiny_base, circles, tmp_path, capsys):
    raw = _fast(tiny_base, circles, tmp_path / "run")
    raw.setdefault(section, {})[key] = value
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and f"{section}.{key}" in error and expected in error, error
    assert not (tmp_path / "run").exists()


def test_validation_images_on_a_method_without_conditioning_are_refused(tiny_base, circles, tmp_path, capsys):
    raw = _fast(tiny_base, circles, tmp_path / "run", method={"kind": "lora"})
    raw["validation"] |= {"prompts": ["a"], "images": [str(circles / "conditioning_images" / "000000.png")]}
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and "takes no conditioning image" in error


def test_method_controlnet_with_another_kind_is_refused(tiny_base, circles, tmp_path, capsys):
    raw = _fast(tiny_base, circles, tmp_path / "run", method={"kind": "lora", "controlnet": str(tiny_base)})
    code, error = _train(tmp_path, raw, capsys)
    assert code == 2 and 'method.controlnet is for kind = "controlnet"' in error


def _special_file(case: str, folder: Path) -> None:
    target = folder / "images" / "000001.png"
    target.unlink()
    if case == "fifo":
        os.mkfifo(target)
    elif case == "dev-zero":
        target.symlink_to("/dev/zero")
    elif case == "strip":
        Image.new("RGB", (20000, 1)).save(target)


SPECIAL = {"fifo": "a FIFO (named pipe)", "dev-zero": "it is a device", "strip": "one side is more than 20 times"}


@pytest.mark.parametrize("case", list(SPECIAL))
@pytest.mark.parametrize("verb", ["train", "data check"])
def test_special_files_and_strips_are_reported_not_read(case, verb, tiny_base, circles, tmp_path, capsys):
    data = shutil.copytree(circles, tmp_path / "data")
    _special_file(case, data)
    if verb == "train":
        code, error = _train(tmp_path, _fast(tiny_base, data, tmp_path / "run"), capsys)
        assert code == 2
    else:
        code = main(["data", "check", str(data), "--resolution", "64", "--report", str(tmp_path / "r.json")])
        error = " ".join(capsys.readouterr().err.split())
        assert code == 1
    assert "row 1" in error and SPECIAL[case] in error, error
