"""Reading a run config: TOML, --set overrides, and every problem reported at once with
its key path (and the closest key for a typo)."""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from difftune.config.run import RunConfig
from difftune.config.sections import _S
from difftune.errors import UserError


class ConfigError(UserError, ValueError):
    """One or more problems in a run configuration, each naming its key."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


PATTERNS = {
    r"\S": "must not be empty",
    r"^[A-Za-z0-9][A-Za-z0-9._-]*$": 'letters, digits, ".", "_" and "-" only, starting with a letter or digit',
}


def _format_error(error: dict[str, Any], section: type[BaseModel] = BaseModel) -> str:
    if section is RunConfig and error["loc"][:1] == ("method",):
        return _method_error(error)
    path = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key{_did_you_mean(section, error['loc'])}"
    if error["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: must be a table (a [{path}] section), got {error['input']!r}"
    if error["type"] in ("string_too_short", "too_short") and error["ctx"].get("min_length") == 1:
        return f"{path}: must not be empty"
    if error["type"] == "string_pattern_mismatch" and error["ctx"]["pattern"] in PATTERNS:
        return f"{path}: {PATTERNS[error['ctx']['pattern']]} (got {error['input']!r})"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"] and re.match(r"^[a-z_]+\.[a-z_.\[\]0-9]+: ", message):
        return message  # a check across sections names its own key
    if "got" in message or isinstance(error["input"], dict):
        return f"{path}: {message}"
    return f"{path}: {message} (got {error['input']!r})"


def _method_error(error: dict[str, Any]) -> str:
    """A problem in [method], whose table is the settings class of its kind (pydantic puts
    the kind in the error's location: method.<kind>.key, said here as method.key, with
    the kind named where a key belongs to another)."""
    from difftune.catalog import methods

    if error["type"] == "unknown_method":
        kind = error["input"].get("kind") if isinstance(error["input"], dict) else None
        known = ", ".join(map(repr, methods()))
        if kind is None:
            return f"method: must be a table (a [method] section) with a kind ({known}), got {error['input']!r}"
        return f"method.kind: unknown method kind {kind!r}; difftune has {known}"
    kind, *rest = error["loc"][1:] or (None,)
    if kind not in methods():  # not inside one kind's table: said as any other error
        return _format_error(error)
    settings = methods()[kind].settings
    located = {**error, "loc": ("method", *rest)}
    if error["type"] != "extra_forbidden":
        return _format_error(located, settings_table(settings))
    key = rest[0] if len(rest) == 1 else None
    owners = [other for other, spec in methods().items() if key in spec.settings.model_fields]
    if owners:
        kinds = " or ".join(f'"{owner}"' for owner in owners)
        return (f"method.{key} is for kind = {kinds} (kind is {kind!r}; its keys: "
                f"{', '.join(settings.model_fields)})")
    return _format_error(located, settings_table(settings))


def settings_table(settings: type[BaseModel]) -> type[BaseModel]:
    """A stand-in for RunConfig with `method` of one settings class, so the generic
    formatting (and its did-you-mean) reads that class's keys."""
    from pydantic import create_model

    return create_model("Run", method=(settings, ...))


def _did_you_mean(section: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """" (did you mean learning_rate?)" for a misspelt key, from the fields of the section
    it was found in; "" when nothing is close."""
    model: Any = section
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = next((arg for arg in (field.annotation, *getattr(field.annotation, "__args__", ()))
                      if isinstance(arg, type) and issubclass(arg, BaseModel)), None)
        if model is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(getattr(model, "model_fields", {})), n=1, cutoff=0.75)
    if close:
        return f" (did you mean {close[0]}?)"
    owners = [name for name, field in RunConfig.model_fields.items() if len(loc) == 1
              and str(loc[0]) in getattr(field.annotation, "model_fields", {})]
    return f" (did you mean {owners[0]}.{loc[0]}?)" if owners else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split "section.key=value"; the value is read as a TOML literal, else kept as a string."""
    if "=" not in text:
        raise ConfigError([f"--set {text}: expected section.key=value"])
    key, raw = text.split("=", 1)
    if not all(part.strip() for part in key.split(".")):
        raise ConfigError([f"--set {text}: expected section.key=value (the key {key.strip()!r} is incomplete)"])
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply "section.key=value" strings (values read as TOML literals)."""
    for text in overrides:
        keys, value = parse_override(text)
        set_key(raw, keys, value, where=f"--set {text}")
    return raw


def set_key(raw: dict[str, Any], keys: list[str], value: Any, where: str = "") -> None:
    """Set raw[k1][k2]... = value, creating sections; for values that are not TOML text
    (paths with quotes or backslashes come through unchanged)."""
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{where or '.'.join(keys)}: {key} is not a section"])
    if isinstance(node.get(keys[-1]), dict) and not isinstance(value, dict):
        raise ConfigError([f"{where or '.'.join(keys)}: {'.'.join(keys)} is a section; set one of its keys "
                           f"({'.'.join(keys)}.KEY=VALUE)"])
    node[keys[-1]] = value


def build_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    return build_section(RunConfig, raw, source)


def build_section(section: type[_S], raw: dict[str, Any], source: str) -> _S:
    """A config section from raw values, every problem reported at once (ConfigError)."""
    try:
        return section.model_validate(raw)
    except ValidationError as error:
        raise ConfigError([_format_error(e, section) for e in error.errors()], source) from None


def load_config(
    path: str | Path, overrides: list[str] = (), values: dict[str, Any] | None = None
) -> RunConfig:
    """Read a TOML run config, apply --set overrides and exact `values` ("section.key":
    value), and validate it whole."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "a folder, not a config file" if path.is_dir() else "no such config file"
        raise ConfigError([f"{path}: {what}"], str(path))
    try:
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not TOML
        raw = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 text (byte {error.object[error.start]:#x} at {error.start}); "
                           "save it as UTF-8"], str(path)) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: not valid TOML: {error}"], str(path)) from None
    raw = apply_overrides(raw, list(overrides))
    for dotted, value in (values or {}).items():
        set_key(raw, dotted.split("."), value)
    return build_config(raw, str(path))
