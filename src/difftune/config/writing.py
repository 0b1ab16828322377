"""Writing a run config: local paths made absolute, and the resolved config as TOML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from difftune.config.run import RunConfig

LOCAL_PATH_KEYS = (
    ("model", "pretrained"), ("model", "tokenizer"), ("data", "path"),
    ("data", "cache_dir"), ("data", "encoded_cache_dir"), ("train", "output_dir"), ("train", "resume"),
    ("validation", "metric_data"),
)


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """The config with every local path made absolute (symlinks kept), so the run records
    where its files are, not where it was started from: `generate` and a resume work from
    any folder. A value that is no local path (a Hub id, "latest") stays as it is; the
    output directory is always local."""
    raw = config.model_dump()
    for section, key in LOCAL_PATH_KEYS:
        value = raw[section][key]
        if value and (Path(value).exists() or (section, key) == ("train", "output_dir")):
            raw[section][key] = os.path.abspath(value)
    raw["validation"]["images"] = [[absolute(v) for v in entry] if isinstance(entry, list) else absolute(entry)
                                   for entry in raw["validation"]["images"]]
    for dotted in config.method.PATH_KEYS:  # each method's own (method.controlnet, ...)
        *tables, key = dotted.split(".")
        table = raw["method"]
        for name in tables:
            table = table.get(name) or {}
        if table.get(key) and Path(table[key]).exists():
            table[key] = os.path.abspath(table[key])
    return RunConfig.model_validate(raw)


def absolute(value: str) -> str:
    """A path that exists, made absolute; anything else as it is."""
    return os.path.abspath(value) if Path(value).exists() else value


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML (None values omitted, since TOML has no null)."""
    lines: list[str] = []
    for section, values in config.model_dump(exclude_none=True).items():
        _write_table(lines, section, values)
    return "\n".join(lines)


def _write_table(lines: list[str], name: str, values: dict[str, Any]) -> None:
    lines.append(f"[{name}]")
    lines.extend(f"{key} = {toml_value(v)}" for key, v in values.items() if not isinstance(v, dict))
    lines.append("")
    for key, value in values.items():
        if isinstance(value, dict):
            _write_table(lines, f"{name}.{key}", value)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
