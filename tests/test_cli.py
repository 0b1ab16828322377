"""The CLI as a user runs it: exit codes, messages, generate, data, hub push."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_config
from PIL import Image

from difftune.cli import main
from difftune.config import build_config
from difftune.export.hub import push_to_hub
from difftune.training.loop import train


def _write_toml(path: Path, raw: dict) -> Path:
    from difftune.config import to_toml

    path.write_text(to_toml(build_config(raw)))
    return path


def test_bad_config_exits_2_with_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[model]\npretrained = "nowhere"\ncolour = 1\n[data]\npath = "d"\nresolution = 100\n'
        '[train]\noutput_dir = "o"\nmax_steps = -1\n'
    )
    done = subprocess.run([sys.executable, "-m", "difftune", "train", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "3 problem(s)" in done.stderr
    for key in ("model.colour: unknown key", "data.resolution: must be divisible by 8", "train.max_steps"):
        assert key in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_data_exits_2_naming_the_column(tmp_path: Path, tiny_base: Path, circles: Path, capsys) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", data={"caption_column": "caption"})
    assert main(["train", str(_write_toml(tmp_path / "c.toml", raw))]) == 2
    assert "data.caption_column = 'caption' is not a column" in capsys.readouterr().err


def test_train_then_generate(tmp_path: Path, tiny_base: Path, circles: Path, held_out: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": 2})
    config = _write_toml(tmp_path / "c.toml", raw)
    assert main(["train", str(config), "--set", "train.max_steps=1"]) == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    out = tmp_path / "out.png"
    code = main(["generate", "--base", str(tiny_base), "--controlnet", str(tmp_path / "run"),
                 "--image", str(held_out / "conditioning_images" / "000000.png"),
                 "--prompt", "red circle with blue background", "--steps", "2", "--seed", "0",
                 "--out", str(out)])
    assert code == 0 and Image.open(out).size == (64, 64)


def test_data_fill_circles_verb(tmp_path: Path) -> None:
    assert main(["data", "fill-circles", str(tmp_path / "fc"), "--n", "3", "--resolution", "32", "--seed", "1"]) == 0
    assert len((tmp_path / "fc" / "metadata.jsonl").read_text().splitlines()) == 3
    assert Image.open(tmp_path / "fc" / "images" / "000000.png").size == (32, 32)


class FakeHub:
    """Stands in for HfApi: records what would be uploaded, sends nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id: str, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return type("RepoUrl", (), {"repo_id": f"someone/{repo_id}"})()

    def upload_folder(self, repo_id: str, folder_path: str, **kwargs):
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        self.uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}


def test_hub_push_uploads_weights_card_and_grids(tmp_path: Path, tiny_base: Path, circles: Path, held_out: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "my-controlnet", held_out, train={"max_steps": 2})
    train(build_config(raw))  # offline here: a run with hub.push = true is refused before training
    raw["hub"] = {"push": True, "private": True}
    config = build_config(raw)
    hub = FakeHub()
    assert push_to_hub(tmp_path / "my-controlnet", config, api=hub) == "someone/my-controlnet"
    assert hub.calls[0] == ("create_repo", {"repo_id": "my-controlnet", "private": True, "exist_ok": True})
    assert hub.calls[1][1]["repo_id"] == "someone/my-controlnet"
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md", "images_0.png"} <= set(hub.uploaded)
    card = hub.uploaded["README.md"].decode()
    assert f"base_model: {tiny_base}" in card
    assert str(circles) in card and "controlnet" in card and "images_0.png" in card
    assert "red circle with blue background" in card


@pytest.mark.parametrize("flag", ["use_8bit_adam", "xformers", "quantize_nf4", "quantize_fp8"])
def test_missing_extras_fail_clearly(flag: str, tmp_path: Path, tiny_base: Path, circles: Path, capsys,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    module, keys, expected = {
        "use_8bit_adam": ("bitsandbytes", {"train": {"use_8bit_adam": True}}, "pip install 'difftune[bnb]'"),
        "xformers": ("xformers", {"train": {"attention": "xformers"}}, "needs xformers"),
        "quantize_nf4": ("bitsandbytes", {"model": {"quantize": "nf4"}},
                         "model.quantize = 'nf4' needs bitsandbytes: pip install 'difftune[bnb]'"),
        "quantize_fp8": ("torchao", {"model": {"quantize": "fp8"}},
                         "model.quantize = 'fp8' needs torchao: pip install 'difftune[fp8]'"),
    }[flag]
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises
    raw = run_config(tiny_base, circles, tmp_path / "run", **keys)
    assert main(["train", str(_write_toml(tmp_path / "c.toml", raw))]) == 2
    assert expected in capsys.readouterr().err
    if flag.startswith("quantize"):  # generate says it too, before loading anything
        kind = keys["model"]["quantize"]
        assert main(["generate", "--base", str(tiny_base), "--prompt", "p", "--quantize", kind,
                     "--out", str(tmp_path / "o.png")]) == 2
        assert expected.replace("model.quantize", "--quantize") in capsys.readouterr().err


def test_lora_train_generate_and_export_verbs(tmp_path: Path, tiny_base: Path, circles: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", method={"kind": "lora"},
                     train={"max_steps": 1, "checkpoint_every": 10})
    assert main(["train", str(_write_toml(tmp_path / "c.toml", raw))]) == 0
    common = ["--prompt", "red circle with blue background", "--steps", "2", "--resolution", "64"]
    assert main(["generate", "--base", str(tiny_base), "--lora", str(tmp_path / "run"), *common,
                 "--out", str(tmp_path / "lora.png")]) == 0
    assert Image.open(tmp_path / "lora.png").size == (64, 64)
    assert main(["export", "lora", str(tmp_path / "run"), str(tmp_path / "k.safetensors")]) == 0
    assert (tmp_path / "k.safetensors").is_file()
    assert main(["export", "single-file", str(tiny_base), str(tmp_path / "sd.safetensors"), "--half"]) == 0
    assert (tmp_path / "sd.safetensors").stat().st_size > 0


def test_export_and_generate_errors_exit_2(tmp_path: Path, tiny_base: Path, capsys) -> None:
    assert main(["export", "lora", str(tmp_path), str(tmp_path / "k.safetensors")]) == 2
    assert "no pytorch_lora_weights.safetensors" in capsys.readouterr().err
    assert main(["export", "single-file", str(tmp_path), str(tmp_path / "x.safetensors")]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["generate", "--base", str(tiny_base), "--controlnet", "x", "--prompt", "p",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "--controlnet needs --image" in capsys.readouterr().err
    assert main(["generate", "--base", str(tiny_base), "--image", "c.png", "--prompt", "p",
                 "--out", str(tmp_path / "o.png")]) == 2
    assert "--image is for a ControlNet (--controlnet), a Control run or an edit run" in capsys.readouterr().err
