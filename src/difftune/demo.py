"""The built-in demo: a tiny base and fill-circles data made locally, then a ControlNet run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from difftune.config import load_config
from difftune.data.synthetic import pil_colour_names, write_fill_circles
from difftune.tiny import build_tiny_sd

# The presets live in the repository's configs/ (an editable install sees them).
PRESET = Path(__file__).resolve().parents[2] / "configs" / "demo" / "fill_circles_controlnet.toml"
CAPTION_WORDS = ["circle", "with", "background"]


def prepare_demo(workdir: Path, samples: int = 512, resolution: int = 64) -> tuple[Path, Path]:
    """Build (once) the tiny random-weight base and the fill-circles data under workdir."""
    base, data = workdir / "base", workdir / "fill-circles"
    if not (base / "model_index.json").is_file():
        build_tiny_sd(base, pil_colour_names() + CAPTION_WORDS, size="demo", seed=0)
    if not (data / "metadata.jsonl").is_file():
        write_fill_circles(data, samples, resolution, seed=0)
        write_fill_circles(workdir / "held-out", 8, resolution, seed=1)
    return base, data


def run_demo(workdir: Path, output_dir: str, overrides: list[str], console: Console) -> Path:
    from difftune.training.loop import train

    base, data = prepare_demo(workdir)
    held_out = workdir / "held-out" / "conditioning_images"
    settings = [
        f'model.pretrained="{base}"',
        f'data.path="{data}"',
        f'train.output_dir="{output_dir}"',
        f'validation.images=["{held_out / "000000.png"}", "{held_out / "000001.png"}"]',
    ]
    config = load_config(PRESET, settings + overrides)
    return train(config, console)
