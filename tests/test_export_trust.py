"""A weights file an export reads may come from anywhere (a download, a shared disk): a
pickled one is never unpickled, and one that is truncated or damaged is named in one
sentence (exit 2), for every export verb, never a traceback from inside safetensors."""

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_run
from safetensors.torch import load_file, save_file

from difftune.cli import main
from difftune.weights import WeightsError, read_tensors


class _Payload:
    """Unpickling this makes a folder: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _said(capsys: pytest.CaptureFixture) -> str:
    return " ".join(capsys.readouterr().err.split())  # the console folds long lines


def _one_sentence(said: str) -> None:
    assert said.startswith("error:") and "Traceback" not in said, said


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.fixture()
def controlnet_folder(finished_run: Path, tmp_path: Path) -> Path:
    """A ControlNet folder (a run's final/) to damage; its layout does not matter, since
    the weights are read before the layout is looked at."""
    return shutil.copytree(finished_run / "final", tmp_path / "controlnet")


def _pickled_instead(folder: Path, marker: Path) -> Path:
    """The folder's safetensors weights replaced by a crafted pickle of the .bin name."""
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    weights = folder / "diffusion_pytorch_model.bin"
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    return weights


def test_export_controlnet_does_not_unpickle_bin_weights(controlnet_folder, tmp_path, capsys) -> None:
    marker = tmp_path / "code-ran"
    weights = _pickled_instead(controlnet_folder, marker)
    assert main(["export", "controlnet", str(controlnet_folder), str(tmp_path / "c.safetensors")]) == 2
    said = _said(capsys)
    _one_sentence(said)
    assert str(weights) in said and "pickled weights" in said and "safetensors" in said
    assert not marker.exists() and not (tmp_path / "c.safetensors").exists()


def test_export_single_file_does_not_unpickle_bin_weights(tiny_base, tmp_path, capsys) -> None:
    pipeline = shutil.copytree(tiny_base, tmp_path / "pipeline")
    marker = tmp_path / "code-ran"
    weights = _pickled_instead(pipeline / "unet", marker)
    assert main(["export", "single-file", str(pipeline), str(tmp_path / "p.safetensors")]) == 2
    said = _said(capsys)
    _one_sentence(said)
    assert str(weights) in said and "pickled weights" in said
    assert not marker.exists()


def test_plain_tensors_in_a_bin_are_not_read_either(tmp_path) -> None:
    """Even a .bin of plain tensors: which pickle is harmless is not told by its name."""
    file = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.zeros(2)}, file)
    with pytest.raises(WeightsError, match="pickled weights"):
        read_tensors(file)


def test_export_controlnet_names_a_truncated_weights_file(controlnet_folder, tmp_path, capsys) -> None:
    weights = controlnet_folder / "diffusion_pytorch_model.safetensors"
    _truncate(weights)
    assert main(["export", "controlnet", str(controlnet_folder), str(tmp_path / "c.safetensors")]) == 2
    said = _said(capsys)
    _one_sentence(said)
    assert str(weights) in said and "not a whole safetensors file" in said


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_export_single_file_names_a_damaged_weights_file(damage, tiny_base, tmp_path, capsys) -> None:
    pipeline = shutil.copytree(tiny_base, tmp_path / "pipeline")
    weights = pipeline / "vae" / "diffusion_pytorch_model.safetensors"
    if damage == "truncated":
        _truncate(weights)
    else:  # a header length that fits, then bytes that are no JSON
        weights.write_bytes((64).to_bytes(8, "little") + b"{" * 64 + bytes(32))
    assert main(["export", "single-file", str(pipeline), str(tmp_path / "p.safetensors")]) == 2
    said = _said(capsys)
    _one_sentence(said)
    assert str(weights) in said


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small diffusers-format LoRA file with its adapter metadata (its tensors outweigh
    its header, so half the file is a whole header and half the weights)."""
    file = tmp_path_factory.mktemp("lora") / "pytorch_lora_weights.safetensors"
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    state = {f"{name}.lora_A.weight": torch.ones(2, 256), f"{name}.lora_B.weight": torch.zeros(256, 2)}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.r": 2})}
    save_file(state, str(file), metadata=metadata)
    return file


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_export_lora_names_a_truncated_file(format, lora_file, tmp_path, capsys) -> None:
    damaged = shutil.copy(lora_file, tmp_path / lora_file.name)
    _truncate(Path(damaged))
    out = tmp_path / "out.safetensors"
    assert main(["export", "lora", str(damaged), str(out), "--format", format, "--family", "sd"]) == 2
    said = _said(capsys)
    _one_sentence(said)
    assert str(damaged) in said and not out.exists()


@pytest.mark.parametrize("adapter", ["[1, 2]", '{"unet.lora_alpha": [4]}', "{"])
def test_export_lora_names_adapter_metadata_it_cannot_read(adapter, lora_file, tmp_path, capsys) -> None:
    """Read as it is, a list would be no alphas (the rank used instead: another strength)."""
    crafted = tmp_path / lora_file.name
    save_file(load_file(str(lora_file)), str(crafted), metadata={"lora_adapter_metadata": adapter})
    assert main(["export", "lora", str(crafted), str(tmp_path / "out.safetensors"), "--family", "sd"]) == 2
    said = _said(capsys)
    _one_sentence(said)
    assert str(crafted) in said and "lora_adapter_metadata" in said


def test_a_sound_lora_still_exports(lora_file, tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    assert main(["export", "lora", str(lora_file), str(out), "--family", "sd"]) == 0
    assert any(key.endswith(".alpha") for key in load_file(str(out)))


def test_export_of_a_run_with_truncated_final_weights_names_them(finished_run, tmp_path, capsys) -> None:
    run = copy_run(finished_run, tmp_path)
    weights = run / "final" / "diffusion_pytorch_model.safetensors"
    _truncate(weights)
    assert main(["export", "controlnet", str(run), str(tmp_path / "c.safetensors")]) == 2
    said = _said(capsys)
    _one_sentence(said)
    assert str(weights) in said


@pytest.mark.parametrize(("verb", "key"), [("controlnet", "conditioning_embedding_out_channels"),
                                           ("single-file", "down_block_types")])
def test_a_config_without_a_key_the_layout_needs_is_named(verb, key, controlnet_folder, tiny_base, tmp_path,
                                                          capsys) -> None:
    folder = controlnet_folder if verb == "controlnet" else shutil.copytree(tiny_base, tmp_path / "pipeline") / "unet"
    config = json.loads((folder / "config.json").read_text())
    del config[key]
    (folder / "config.json").write_text(json.dumps(config))
    source = folder if verb == "controlnet" else folder.parent
    assert main(["export", verb, str(source), str(tmp_path / "out.safetensors")]) == 2
    said = _said(capsys)
    _one_sentence(said)
    assert str(folder / "config.json") in said and key in said
