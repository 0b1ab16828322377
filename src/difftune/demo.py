"""The built-in demos, on the committed tiny fill-circles base and data: a ControlNet
(the default), and DreamBooth-LoRA teaching the base a new shape."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from difftune.config import RunConfig, load_config
from difftune.errors import InputError

# The repository root: the preset's paths (assets/...) are relative to it.
ROOT = Path(__file__).resolve().parents[2]
PRESETS = {
    "controlnet": ROOT / "configs" / "demo" / "fill_circles_controlnet.toml",
    "dreambooth": ROOT / "configs" / "demo" / "dreambooth_lora_squares.toml",
}


def demo_config(output_dir: str, overrides: list[str], preset: str = "controlnet") -> RunConfig:
    """A demo preset's config, writing into output_dir (absolute: the run goes from the
    repository root)."""
    if not output_dir.strip():
        raise InputError("--output-dir is empty; give the folder to train into")
    output = Path(output_dir).expanduser().resolve()
    values = {"train.output_dir": str(output)}
    if preset == "dreambooth" and not any(o.startswith("method.dreambooth.class_data") for o in overrides):
        values["method.dreambooth.class_data"] = str(output / "class-images")  # not into the repository
    return load_config(PRESETS[preset], overrides, values)


@contextlib.contextmanager
def in_repository_root() -> Iterator[None]:
    """The presets' paths (assets/...) are relative to the repository root."""
    previous = Path.cwd()
    os.chdir(ROOT)
    try:
        yield
    finally:
        os.chdir(previous)

