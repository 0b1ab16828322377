"""Model families, by config name: every module in this folder that defines `FAMILY`.

A new family is one file here (and its presets in configs/<name>/); nothing else names
it. The modules are light (heavy imports inside functions), so the config can ask which
families exist and what each supports before torch is imported.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
from pathlib import Path

from difftune.families.base import Family, ModelInputs, Parts


@functools.cache
def families() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        family = getattr(module, "FAMILY", None)
        if family is not None:
            found[family.name] = family
    return found


def get_family(name: str) -> Family:
    return families()[name]


def family_of_pipeline(folder: Path) -> Family | None:
    """The family whose pipeline class a saved pipeline's model_index.json names (None:
    not a local pipeline, or a class no family knows)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    for family in families().values():
        if name in family.pipeline_classes.values():
            return family
    return None


def check_base(key: str, base: str, family_name: str, flag: str) -> None:
    """A local base pipeline is of the family the run or command says (an SDXL folder run
    as "sd" fails deep inside the UNet otherwise), and whole in what that family needs
    beyond its files (SDXL: tokenizers of one length). Named before any model loads."""
    from difftune.paths import PathError

    folder = Path(base).expanduser()
    found = family_of_pipeline(folder)
    if found is not None and found.name != family_name:
        raise PathError(f"{key} = {base!r} is a {found.description} pipeline (family {found.name!r}), but {flag} "
                        f"is {family_name!r}: set {flag} to {found.name!r}")
    problems = get_family(family_name).folder_problems(folder) if folder.is_dir() else []
    if problems:
        raise PathError(f"{key} = {base!r}: " + "; ".join(problems))


__all__ = ["Family", "ModelInputs", "Parts", "check_base", "families", "family_of_pipeline", "get_family"]
