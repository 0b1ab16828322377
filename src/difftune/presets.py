"""The presets (configs/<family>/<method>.toml and configs/demo/*.toml): listed with one
line each (`difftune presets`), and copied with their comments to start a config from
(`difftune init FAMILY/METHOD [OUT.toml]`). A preset is named by its path under configs/
without ".toml": "sdxl/lora", "demo/fill_circles_controlnet"."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from difftune.errors import InputError

ROOT = Path(__file__).resolve().parents[2] / "configs"
"""The presets live in the repository's configs/ (a source checkout, or an editable install)."""


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path

    @property
    def summary(self) -> str:
        """The first sentence of the comment block the preset opens with."""
        lines = []
        for line in self.path.read_text().splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
        text = " ".join(lines)
        first = re.split(r"(?<=[a-z0-9)])[.:] ", text, maxsplit=1)[0].rstrip(".:")
        return first if len(first) <= 110 else first[:109].rstrip() + "…"


def presets_root() -> Path:
    if not ROOT.is_dir():
        raise InputError(f"no presets here: they are the configs/ folder of difftune's source repository "
                         f"({ROOT} does not exist in this install); clone it, or write a config by hand")
    return ROOT


def all_presets() -> list[Preset]:
    root = presets_root()
    return [Preset(path.relative_to(root).with_suffix("").as_posix(), path) for path in sorted(root.glob("*/*.toml"))]


def find_preset(name: str) -> Preset:
    """The preset called `name` ("sdxl/lora"; ".toml" may be given); an InputError lists them."""
    wanted = name.strip().removesuffix(".toml")
    presets = all_presets()
    for preset in presets:
        if preset.name == wanted:
            return preset
    close = [p.name for p in presets if wanted.split("/")[0] == p.name.split("/")[0]] or [p.name for p in presets]
    raise InputError(f"no preset {name!r}; there are: {', '.join(close)} (`difftune presets` lists them all)")


def write_preset(name: str, out: Path) -> Path:
    """Copy the preset, comments and all, to `out` (a new file: an existing one is kept)."""
    preset = find_preset(name)
    if out.exists():
        raise InputError(f"{out} exists; give another file name (nothing was written)")
    if out.suffix != ".toml":
        raise InputError(f"{out}: a config is a .toml file")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(preset.path.read_text())
    return out
