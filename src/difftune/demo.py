"""The built-in demo: a ControlNet on the committed tiny fill-circles base and data."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from difftune.config import load_config

# The repository root: the preset's paths (assets/...) are relative to it.
ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "configs" / "demo" / "fill_circles_controlnet.toml"


def run_demo(output_dir: str, overrides: list[str], console: Console) -> Path:
    """Train the demo preset from the repository root; returns the final ControlNet folder."""
    import os

    from difftune.training.loop import train

    output = Path(output_dir).resolve()
    config = load_config(PRESET, overrides, {"train.output_dir": str(output)})
    previous = Path.cwd()
    os.chdir(ROOT)
    try:
        return train(config, console)
    finally:
        os.chdir(previous)
