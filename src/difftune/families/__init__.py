"""Model families, by config name: every module in this folder that defines `FAMILY`.

A new family is one file here (and its presets in configs/<name>/); nothing else names
it. The modules are light (heavy imports inside functions), so the config can ask which
families exist and what each supports before torch is imported.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path

from difftune.families.base import Family, ModelInputs, Parts
from difftune.families.limits import check_sizes_fit, size_rule, vae_factor


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


def family_of_pipeline(folder: Path, revision: str | None = None) -> Family | None:
    """The family a saved pipeline is of (None: no readable model_index.json, or nothing
    any family knows): the one whose pipeline classes include the _class_name its
    model_index.json names, else the one whose denoiser and text encoders it lists, by
    class (a pipeline class of its own over a family's models, as LCM's over SD's)."""
    from difftune.families.limits import read_config

    index = read_config(str(folder), "model_index.json", revision)
    if index is None:
        return None
    name = index.get("_class_name")
    for family in families().values():
        if name in family.pipeline_classes.values():
            return family
    return next((family for family in families().values() if _lists_models_of(index, family)), None)


def _lists_models_of(index: dict, family: Family) -> bool:
    """model_index.json lists exactly the family's text encoders and its denoiser, by class."""
    def listed_class(part: str) -> str | None:
        entry = index.get(part)
        return entry[1] if isinstance(entry, list) and len(entry) == 2 else None

    encoders = {key for key, entry in index.items() if key.startswith("text_encoder") and listed_class(key)}
    classes = getattr(family, "text_encoder_classes", {})
    return (listed_class(family.denoiser_name) == getattr(family, "denoiser_class", None)
            and encoders == set(classes) and all(listed_class(key) == cls for key, cls in classes.items()))


def check_base(key: str, base: str, family_name: str, flag: str, revision: str | None = None) -> None:
    """A base pipeline is of the family the run or command says (an SDXL folder run as
    "sd" fails deep inside the UNet otherwise), of a family difftune has at all, and whole
    in what that family needs beyond its files (SDXL: tokenizers of one length). Named
    from its configs (a local folder, or a Hub id in the local cache) before any model loads."""
    from difftune.families.limits import pipeline_class
    from difftune.paths import PathError

    folder = Path(base).expanduser()
    found = family_of_pipeline(folder, revision)
    if found is not None and found.name != family_name:
        raise PathError(f"{key} = {base!r} is a {found.description} pipeline (family {found.name!r}), but {flag} "
                        f"is {family_name!r}: set {flag} to {found.name!r}")
    named = pipeline_class(base, revision)
    if found is None and named is not None:
        known = "; ".join(f"{f.name!r}: {', '.join(sorted(f.pipeline_classes.values()))}"
                          for f in families().values())
        raise PathError(f"{key} = {base!r} is a {named} (its model_index.json), which no difftune family trains "
                        f"or runs (difftune has {known})")
    problems = get_family(family_name).folder_problems(folder) if folder.is_dir() else []
    if problems:
        raise PathError(f"{key} = {base!r}: " + "; ".join(problems))


def base_family_problem(key: str, base: str, family_name: str, revision: str | None = None) -> str | None:
    """The sentence check_base raises about the base's family (another family, or none
    difftune has), for the config's own checks; None when it fits or cannot be read."""
    from difftune.paths import PathError

    try:
        check_base(key, base, family_name, "model.family", revision)
    except PathError as error:
        return str(error)
    return None


__all__ = ["Family", "ModelInputs", "Parts", "base_family_problem", "check_base", "check_sizes_fit", "families",
           "family_of_pipeline", "get_family", "size_rule", "vae_factor"]
