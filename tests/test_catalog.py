"""The catalog lists every family from its facts alone: the config is checked against it
before torch or any family's code is imported, and the facts are the family's own."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from difftune.catalog import families as listed
from difftune.families import families


def test_the_config_loads_without_any_familys_code_or_torch() -> None:
    preset = Path(__file__).parents[1] / "configs" / "sdxl" / "lora.toml"
    code = ("import sys; "
            f"from difftune.config import load_config; load_config({str(preset)!r}); "
            "loaded = sorted(m for m in sys.modules if m.startswith('difftune.families') or m == 'torch'); "
            "print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = eval(out)
    assert "torch" not in modules
    assert not [m for m in modules if m.endswith(".family")], modules
    assert "difftune.families.sdxl.facts" in modules


def test_each_familys_code_has_the_facts_the_catalog_lists() -> None:
    assert sorted(listed()) == sorted(families()) == ["cogview4", "flux", "qwenimage", "qwenimage_edit", "sd", "sd3",
                                                       "sdxl"]
    for name, facts in listed().items():
        family = families()[name]
        for fact in fields(facts):
            assert getattr(family, fact.name) == getattr(facts, fact.name), (name, fact.name)
