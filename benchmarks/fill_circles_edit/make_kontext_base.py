"""The Kontext-shaped fill-circles base: the tiny Flux fill-circles base (FLUX.1 and
FLUX.1 Kontext share FluxTransformer2DModel) as a FluxKontextPipeline folder, its T5
prompt length raised from 8 to 16 tokens so that an instruction ("make the circle red":
"make" and "the" are spelled letter by letter by its word tokenizer) keeps its colour.
No weight changes: T5 has relative positions, so a longer prompt needs none.

    python benchmarks/fill_circles_edit/make_kontext_base.py [OUT]   (default assets/fill-circles-base-kontext)
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "assets" / "fill-circles-base-flux"
T5_LENGTH = 16


def make_kontext_base(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(SOURCE, out)
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "FluxKontextPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    settings_file = out / "tokenizer_2" / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings["model_max_length"] = T5_LENGTH
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    return out


if __name__ == "__main__":
    print(make_kontext_base(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "assets" / "fill-circles-base-kontext"))
