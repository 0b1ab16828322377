"""A base's JSON files (model_index.json, each part's config.json), read before any weight
loads: from a local folder, or from a Hub id already in the local Hub cache (nothing is
downloaded here). Light: no torch, no diffusers; anything may import it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_config(base: str, name: str, revision: str | None = None) -> dict[str, Any] | None:
    """The JSON file `name` ("vae/config.json", "model_index.json") of a local folder or of a
    Hub id in the local Hub cache; None when neither has it or it is not a JSON object."""
    path = Path(base).expanduser() / name
    if not path.is_file():
        path = _cached(base, name, revision)
    if path is None:
        return None
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _cached(repo_id: str, name: str, revision: str | None) -> Path | None:
    from difftune.paths import looks_like_path

    if looks_like_path(repo_id):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, name, revision=revision)
    except ValueError:  # not a valid repository id after all
        return None
    return Path(found) if isinstance(found, str) else None


def pipeline_class(base: str, revision: str | None = None) -> str | None:
    """The _class_name a base's model_index.json names (None: not readable)."""
    index = read_config(base, "model_index.json", revision)
    name = index.get("_class_name") if index is not None else None
    return name if isinstance(name, str) else None
