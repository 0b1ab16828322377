"""The one place a user's weights file is opened for conversion (exports and the families'
single-file layouts). A weights file may come from anywhere (a download, a shared disk),
so it is read as safetensors only: a pickled one (.bin, .pt, .ckpt) is refused without
being read, since unpickling can run code and no file name tells a harmless pickle from a
crafted one. A file that is truncated or damaged, and a config or adapter metadata that is
not what it should be, is one sentence naming the file (WeightsError, exit 2), never a
traceback from inside safetensors or json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.errors import UserError

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class WeightsError(UserError):
    """A file an export reads that it cannot read: pickled, damaged or malformed."""


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _refuse_pickle(file)
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise _unreadable(file, error) from None


def read_metadata(file: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header ({} when it has none)."""
    from safetensors import SafetensorError, safe_open

    _refuse_pickle(file)
    try:
        with safe_open(str(file), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise _unreadable(file, error) from None


class Config(dict):
    """A component's config.json: a key the conversion needs and the file lacks is a
    WeightsError naming both (as `config[key]`; `config.get` reads optional keys)."""

    def __init__(self, file: Path, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.file = file

    def __missing__(self, key: str) -> Any:
        raise WeightsError(f"{self.file} has no {key!r}, which the conversion needs: is it the config of another "
                           "kind of model, or was it edited? Write or download it again")


def read_config(file: Path) -> Config:
    return Config(file, read_json_object(file))


def read_json_object(file: Path, text: str | None = None, what: str = "") -> dict[str, Any]:
    """A JSON object: the file's text, or `text` found in it (`what` names where)."""
    where = f"{file}'s {what}" if what else str(file)
    try:
        found = json.loads(file.read_text(encoding="utf-8") if text is None else text)
    except (OSError, ValueError) as error:
        raise WeightsError(f"{where} is not readable JSON ({error}); write or download it again") from None
    if not isinstance(found, dict):
        raise WeightsError(f"{where} is JSON, but not an object of keys and values; write or download it again")
    return found


def _refuse_pickle(file: Path) -> None:
    if file.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{file} holds pickled weights, which difftune does not read (unpickling can run code): convert "
            "them to safetensors where you trust the file (from_pretrained, then save_pretrained) and export again")


def _unreadable(file: Path, error: Exception) -> WeightsError:
    return WeightsError(f"{file} is not a whole safetensors file ({error}): it is truncated, damaged or of "
                        "another format; write or download it again")
