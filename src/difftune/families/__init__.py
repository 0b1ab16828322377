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


def vae_factor(vae: str | None, base: str) -> int | None:
    """How many pixels make one latent, from the VAE's config.json (local folders only)."""
    config = Path(vae).expanduser() / "config.json" if vae else Path(base).expanduser() / "vae" / "config.json"
    try:
        return 2 ** (len(json.loads(config.read_text(encoding="utf-8"))["block_out_channels"]) - 1)
    except (ValueError, OSError, KeyError, TypeError):
        return None


def check_sizes_fit(sizes: dict[str, int], factor: int | None, patch: int, family: str) -> None:
    """Every training size makes whole latent patches: a multiple of the VAE factor times
    the denoiser's patch (Flux packs 2x2), named before any model loads."""
    if factor is None:
        return
    multiple = factor * patch
    for key, value in sizes.items():
        if value % multiple:
            why = f"the VAE factor {factor} x the {patch}x{patch} patches {family} packs" if patch > 1 else \
                f"the VAE factor {factor}"
            from difftune.paths import PathError

            raise PathError(f"{key} = {value} must be a multiple of {multiple} ({why})")


__all__ = ["Family", "ModelInputs", "Parts", "check_base", "check_sizes_fit", "families", "family_of_pipeline", "get_family", "vae_factor"]
