"""The built-in demos, on the committed tiny fill-circles base and data: a ControlNet
(the default), and DreamBooth-LoRA teaching the base a new shape."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from difftune.config import load_config

# The repository root: the preset's paths (assets/...) are relative to it.
ROOT = Path(__file__).resolve().parents[2]
PRESETS = {
    "controlnet": ROOT / "configs" / "demo" / "fill_circles_controlnet.toml",
    "dreambooth": ROOT / "configs" / "demo" / "dreambooth_lora_squares.toml",
}


def run_demo(output_dir: str, overrides: list[str], console: Console, preset: str = "controlnet") -> Path:
    """Train a demo preset from the repository root; returns its final/ folder."""
    import os

    from difftune.training.loop import train

    output = Path(output_dir).resolve()
    values = {"train.output_dir": str(output)}
    if preset == "dreambooth" and not any(o.startswith("method.dreambooth.class_data") for o in overrides):
        values["method.dreambooth.class_data"] = str(output / "class-images")  # not into the repository
    config = load_config(PRESETS[preset], overrides, values)
    previous = Path.cwd()
    os.chdir(ROOT)
    try:
        return train(config, console)
    finally:
        os.chdir(previous)
