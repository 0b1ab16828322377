"""Model families, by config name: every folder here with a facts.py (what the catalog
lists) and a family.py that defines `FAMILY` (its code).

A new family is one folder here (and its presets in configs/<name>/); nothing else names
it. The config reads only the facts (difftune/catalog.py); the code is light too (heavy
imports inside functions), so a family's checks run before torch is imported.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path

from difftune import catalog
from difftune.families.base import Family, ModelInputs, Parts
from difftune.families.limits import check_sizes_fit, size_rule, vae_factor


@functools.cache
def families() -> dict[str, Family]:
    """Each family's code (its FAMILY), by the names the catalog lists."""
    return {name: importlib.import_module(f"{__name__}.{name}.family").FAMILY for name in catalog.families()}


def get_family(name: str) -> Family:
    return families()[name]


def family_of_pipeline(folder: Path, revision: str | None = None) -> Family | None:
    """The family a saved pipeline is of (catalog.family_of_pipeline), with its code."""
    facts = catalog.family_of_pipeline(folder, revision)
    return None if facts is None else get_family(facts.name)


def check_base(key: str, base: str, family_name: str, flag: str, revision: str | None = None) -> None:
    """A base pipeline is of the family the run or command says, of a family difftune has
    at all (catalog.base_family_problem), and whole in what that family needs beyond its
    files (SDXL: tokenizers of one length). From its configs, before any model loads."""
    from difftune.paths import PathError

    problem = catalog.base_family_problem(key, base, family_name, flag, revision)
    if problem is not None:
        raise PathError(problem)
    folder = Path(base).expanduser()
    problems = get_family(family_name).folder_problems(folder) if folder.is_dir() else []
    if problems:
        raise PathError(f"{key} = {base!r}: " + "; ".join(problems))


__all__ = ["Family", "ModelInputs", "Parts", "check_base", "check_sizes_fit", "families",
           "family_of_pipeline", "get_family", "size_rule", "vae_factor"]
