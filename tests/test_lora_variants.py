"""LoRA variants ([method.lora] variant): a DoRA run's file loads in diffusers like a LoRA's,
changes its output as trained, and its kohya export (LyCORIS' `dora_scale`) merges to the
weights peft merges, by LyCORIS' own formula written here independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_config
from safetensors.torch import load_file
from test_methods import caption_folder, load_base, pipeline_image, trained_image

from difftune.config import ConfigError, build_config
from difftune.export.lora import export_lora
from difftune.training.loop import Run

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


@pytest.fixture(scope="module")
def dora_run(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    captions = caption_folder(tmp_path_factory.mktemp("captions") / "folder", 8)
    out = tmp_path_factory.mktemp("dora") / "run"
    raw = run_config(tiny_base, captions, out, method={
        "kind": "lora", "lora": {"variant": "dora", "rank": 4, "alpha": 8.0, "init": "kaiming",
                                 "target_modules": TARGETS}},
        train={"learning_rate": 1e-2})
    run = Run(build_config(raw))
    run.fit()
    return run


def test_a_dora_run_trains_magnitudes_and_loads_in_diffusers_as_trained(dora_run: Run, tiny_base: Path) -> None:
    unet = dora_run.accelerator.unwrap_model(dora_run.trainee.trained["unet"])
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in name for name in trainable)
    saved = load_file(dora_run.run_dir / "final" / "pytorch_lora_weights.safetensors")
    assert any(key.endswith("lora_magnitude_vector") for key in saved)
    base_image = pipeline_image(load_base(tiny_base))
    loaded = load_base(tiny_base)
    loaded.load_lora_weights(dora_run.run_dir / "final")
    dora_image = pipeline_image(loaded)
    assert np.abs(dora_image - base_image).max() > 1e-3
    assert np.abs(trained_image(dora_run) - dora_image).max() < 1e-5


def lycoris_dora_merge(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float,
                       scale: torch.Tensor) -> torch.Tensor:
    """LyCORIS' DoRA with the magnitude on the output axis: W + delta normalised per output
    row, times dora_scale."""
    rank = down.shape[0]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * (alpha / rank)
    merged = weight + delta
    norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
    return scale.reshape(-1, *[1] * (weight.ndim - 1)) * merged / norm


def test_the_kohya_export_of_a_dora_merges_to_pefts_weights(dora_run: Run, tiny_base: Path, tmp_path: Path) -> None:
    exported = load_file(export_lora(dora_run.run_dir, tmp_path / "dora.safetensors"))
    scales = {key for key in exported if key.endswith(".dora_scale")}
    assert scales
    pipe = load_base(tiny_base)
    base = {name: module.weight.detach().clone() for name, module in pipe.unet.named_modules()
            if hasattr(module, "weight") and isinstance(module.weight, torch.Tensor)}
    pipe.load_lora_weights(dora_run.run_dir / "final")
    pipe.fuse_lora()  # peft's own merge
    fused = {name: module.weight.detach() for name, module in pipe.unet.named_modules()
             if name in base and hasattr(module, "weight")}
    checked = 0
    for name, weight in base.items():
        key = f"lora_unet_{name.replace('.', '_')}"
        if f"{key}.dora_scale" not in exported:
            continue
        scale = exported[f"{key}.dora_scale"]
        assert scale.shape == (weight.shape[0],) + (1,) * (weight.ndim - 1)  # (out, 1) / (out, 1, 1, 1)
        merged = lycoris_dora_merge(weight, exported[f"{key}.lora_down.weight"], exported[f"{key}.lora_up.weight"],
                                    exported[f"{key}.alpha"].item(), scale)
        assert torch.allclose(merged, fused[name], atol=1e-5), name
        checked += 1
    assert checked == len(scales) and any(base[n].ndim == 4 for n in base
                                          if f"lora_unet_{n.replace('.', '_')}.dora_scale" in exported)


def test_a_variant_difftune_does_not_train_is_named(tiny_base: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, tmp_path, tmp_path / "run", method={"kind": "lora", "lora": {"variant": "lokr2"}})
    with pytest.raises(ConfigError, match="variant"):
        build_config(raw)
