"""What a base allows, read from its configs before any weight loads: the image sizes
its VAE and denoiser can take, and what its model_index.json says it is (read by difftune/model_files.py).

Every number comes from the base's own files (a local folder, or a Hub id already in the
local Hub cache; nothing is downloaded here): the VAE's downsampling from
vae/config.json, a transformer's patch from its config, the pipeline class from
model_index.json. Where a base's configs cannot be read, the checks are skipped and the
libraries check as they load. Light: no torch, no diffusers.
"""

from __future__ import annotations

import math
from typing import Any

from difftune.model_files import read_config
from difftune.paths import PathError


def vae_factor(vae: str | None, base: str, revision: str | None = None) -> int | None:
    """How many pixels make one latent: 2 ** (VAE stages - 1), from the VAE's config.json
    (model.vae's, else the base's vae/); Qwen-Image's VAE halves once per entry of its
    temperal_downsample."""
    config = read_config(vae, "config.json", revision) if vae else read_config(base, "vae/config.json", revision)
    try:
        if "temperal_downsample" in config:  # type: ignore[operator]
            return 2 ** len(config["temperal_downsample"])  # type: ignore[index]
        return 2 ** (len(config["block_out_channels"]) - 1)  # type: ignore[index]
    except (KeyError, TypeError):
        return None


def size_rule(family: Any, base: str, vae: str | None = None, revision: str | None = None) -> tuple[int, str] | None:
    """(the multiple every image side must be, why), from the base's configs: the VAE factor
    x the denoiser's patch (family.latent_patch_of), and what the family's pipelines demand
    besides (CogView4Pipeline: multiples of 16). None when the VAE's config cannot be read."""
    factor = vae_factor(vae, base, revision)
    if factor is None:
        return None
    patch, patch_why = family.latent_patch_of(base, revision)
    why = f"the VAE factor {factor}" + (" of model.vae" if vae else "")
    if patch > 1:
        why += f" x {patch_why}"
    multiple = factor * patch
    demanded = family.pipeline_multiple
    if multiple % demanded:
        multiple = math.lcm(multiple, demanded)
        why += f", and {family.pipeline_classes['text_to_image']} takes multiples of {demanded}"
    return multiple, why


def check_sizes_fit(sizes: dict[str, int], family: Any, base: str, vae: str | None = None,
                    revision: str | None = None) -> None:
    """Every size (data.resolution, data.bucket_step, --resolution...) makes whole latent
    patches the family's pipelines take, named before any model loads."""
    rule = size_rule(family, base, vae, revision)
    if rule is None:
        return
    multiple, why = rule
    for key, value in sizes.items():
        if value % multiple:
            lower, upper = value - value % multiple, value - value % multiple + multiple
            nearest = f"{lower} or {upper}" if lower else f"{upper}"
            raise PathError(f"{key} = {value} must be a multiple of {multiple} ({why}, from the base's configs); "
                            f"{nearest} would do")


def part_module_names(family: Any, base: str, part: str, revision: str | None = None) -> set[str] | None:
    """The module paths of one part of the base (its denoiser or a text encoder), built
    from its config.json on the meta device: no weight is read or allocated. None when
    the config cannot be read or built."""
    config = read_config(base, f"{part}/config.json", revision)
    if config is None:
        return None
    import torch

    try:
        with torch.device("meta"):
            if part == family.denoiser_name:
                import diffusers

                model = getattr(diffusers, family.denoiser_class).from_config(config)
            else:
                import transformers

                cls = getattr(transformers, family.text_encoder_classes[part])
                model = cls(cls.config_class.from_dict(config))
    except Exception:  # noqa: BLE001 (a config this version cannot build: the load says why)
        return None
    return {name for name, _ in model.named_modules()}


def unmatched_targets(targets: list[str] | tuple[str, ...], names: set[str]) -> list[str]:
    """The LoRA targets no module path matches, as peft matches a list of names (the whole
    path, or its end after a dot). peft refuses only when none matches, and drops the rest."""
    return [target for target in targets
            if not any(name == target or name.endswith("." + target) for name in names)]
