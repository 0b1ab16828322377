"""What difftune trains, listed without loading any of it: each family's facts (its name,
pipelines, classes, capabilities, its limits at config load), each method's spec (its
settings, what it needs of a family, its factory) and which family a saved base is. At
the bottom of the tree: the config checks a run against the catalog before torch is
imported, and nothing here imports the config, torch or a family's or method's code.

A family declares its facts in `families/<name>/facts.py` (FACTS), a method its spec in
`methods/<kind>/spec.py` (SPEC); the catalog finds every folder that has one. A family's
code (`families/<name>/family.py`) takes the same facts as its attributes
(families.latent.LatentFamily), so each is written once; a method's code is imported
from its spec's factory when a run starts.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.model_files import pipeline_class, read_config


@dataclass(frozen=True)
class FamilyFacts:
    """A family as the config and the CLI see it, before any of its code loads."""

    name: str
    description: str
    """What the family covers, for messages and the config's docs."""
    capabilities: frozenset[str]
    """What its code offers beyond the core every family has (load, encode, predict,
    pipelines): "controlnet" (make_controlnet and its residuals), "control" (the
    channel-concat input widened), "lora" (peft adapters on its denoiser and their key
    formats), "token_embeddings" (CLIP text encoders whose vocabulary can grow, read by
    its pipelines' load_textual_inversion), "single_file" (its original single-file layout,
    for `difftune export single-file`), "edit" (reference images' latents joined to the
    denoiser's tokens, as its edit pipeline does: FLUX.1 Kontext, Qwen-Image-Edit). The
    methods it trains follow (`supports`)."""
    objective_kind: str
    """"ddpm" or "flow_matching": which [objective] options apply."""
    default_resolution: int
    denoiser_name: str
    denoiser_class: str
    text_encoder_classes: dict[str, str]
    """transformers class of each text encoder, by part name (in encoding order)."""
    pipeline_classes: dict[str, str]
    """diffusers pipeline class names by what they run: "text_to_image", "controlnet", "control"."""
    caches_text: bool = True
    """Whether a caption's embedding is the same in every batch (CogView4 pads to the batch)."""
    mixed_precisions: tuple[str, ...] | None = None
    """The train.mixed_precision values it trains in (None: any)."""
    text_encoder_trainable: bool = True
    controlnet_blocks: bool = False
    """Whether a new ControlNet copies a chosen number of blocks (Flux) rather than the
    whole encoder (the UNet families)."""

    @property
    def supports(self) -> frozenset[str]:
        """The method kinds it trains: those whose needs its capabilities meet."""
        return frozenset(kind for kind, spec in methods().items() if spec.needs <= self.capabilities)


@dataclass(frozen=True)
class MethodSpec:
    """A training method as the config and the CLI see it, before any of its code loads."""

    kind: str
    """Its `[method] kind`; also its folder, methods/<kind>/."""
    description: str
    settings: type
    """Its [method] table: a method_settings.MethodSettings subclass with only its own
    keys, whose traits (needs_conditioning, result, ...) the config's checks read."""
    needs: frozenset[str]
    """The family capabilities it needs (FamilyFacts.capabilities)."""
    factory: str
    """"module:name" of what builds the method from its settings; imported when a run starts."""
    default: bool = False
    """The kind a [method] table without `kind` is (one method says so)."""

    def make(self, settings: Any) -> Any:
        module, name = self.factory.split(":")
        return getattr(importlib.import_module(module), name)(settings)


def _discover(package: str, file: str, attribute: str) -> dict[str, Any]:
    """`attribute` of `<package>.<folder>.<file>` for every folder that has the file, by folder."""
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations is not None
    found: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(spec.submodule_search_locations), key=lambda m: m.name):
        if info.ispkg and importlib.util.find_spec(f"{package}.{info.name}.{file}") is not None:
            found[info.name] = getattr(importlib.import_module(f"{package}.{info.name}.{file}"), attribute)
    return found


@functools.cache
def families() -> dict[str, FamilyFacts]:
    """Every family folder's facts, by name."""
    found = _discover("difftune.families", "facts", "FACTS")
    for folder, facts in found.items():
        if facts.name != folder:  # the folder is how the family's code is found
            raise RuntimeError(f"families/{folder}/facts.py names its family {facts.name!r}, not {folder!r}")
    return {facts.name: facts for facts in found.values()}


@functools.cache
def methods() -> dict[str, MethodSpec]:
    """Every method folder's spec, by kind."""
    found = _discover("difftune.methods", "spec", "SPEC")
    for folder, spec in found.items():
        if spec.kind != folder:
            raise RuntimeError(f"methods/{folder}/spec.py names its kind {spec.kind!r}, not {folder!r}")
    defaults = [spec.kind for spec in found.values() if spec.default]
    if len(defaults) != 1:
        raise RuntimeError(f"exactly one method spec must be the default kind (found {defaults})")
    return found


def default_method() -> str:
    return next(kind for kind, spec in methods().items() if spec.default)


def family_names() -> list[str]:
    return sorted(families())


def family_of_pipeline(folder: Path, revision: str | None = None) -> FamilyFacts | None:
    """The family a saved pipeline is of (None: no readable model_index.json, or nothing
    any family knows): the one whose pipeline classes include the _class_name its
    model_index.json names, else the one whose denoiser and text encoders it lists, by
    class (a pipeline class of its own over a family's models, as LCM's over SD's)."""
    index = read_config(str(folder), "model_index.json", revision)
    if index is None:
        return None
    name = index.get("_class_name")
    for facts in families().values():
        if name in facts.pipeline_classes.values():
            return facts
    return next((facts for facts in families().values() if _lists_models_of(index, facts)), None)


def _lists_models_of(index: dict, facts: FamilyFacts) -> bool:
    """model_index.json lists exactly the family's text encoders and its denoiser, by class."""
    def listed_class(part: str) -> str | None:
        entry = index.get(part)
        return entry[1] if isinstance(entry, list) and len(entry) == 2 else None

    encoders = {key for key, entry in index.items() if key.startswith("text_encoder") and listed_class(key)}
    classes = facts.text_encoder_classes
    return (listed_class(facts.denoiser_name) == facts.denoiser_class
            and encoders == set(classes) and all(listed_class(key) == cls for key, cls in classes.items()))


def base_family_problem(key: str, base: str, family_name: str, flag: str, revision: str | None = None) -> str | None:
    """Why a base is not of the family the run or command says (an SDXL folder run as "sd"
    fails deep inside the UNet otherwise), or of no family difftune has; None when it fits
    or its model_index.json cannot be read. From its configs, before any model loads."""
    found = family_of_pipeline(Path(base).expanduser(), revision)
    if found is not None and found.name != family_name:
        return (f"{key} = {base!r} is a {found.description} pipeline (family {found.name!r}), but {flag} "
                f"is {family_name!r}: set {flag} to {found.name!r}")
    named = pipeline_class(base, revision)
    if found is None and named is not None:
        known = "; ".join(f"{f.name!r}: {', '.join(sorted(f.pipeline_classes.values()))}" for f in families().values())
        return (f"{key} = {base!r} is a {named} (its model_index.json), which no difftune family trains "
                f"or runs (difftune has {known})")
    return None
