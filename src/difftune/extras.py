"""Optional dependencies: a clear error naming the setting and the install command when
one a config or a flag asks for is missing, checked before any model loads."""

from __future__ import annotations

import importlib.util
from typing import Any

from difftune.errors import UserError


class MissingExtra(UserError, RuntimeError):
    """An optional dependency the config asks for is not installed."""


def require_bitsandbytes(key: str = "train.use_8bit_adam = true") -> Any:
    try:
        import bitsandbytes
    except ImportError:
        raise MissingExtra(f"{key} needs bitsandbytes: pip install 'difftune[bnb]'") from None
    return bitsandbytes


# model.quantize / generate --quantize: the package each kind needs, and its extra
QUANTIZERS = {"nf4": ("bitsandbytes", "bnb"), "int8": ("bitsandbytes", "bnb"), "fp8": ("torchao", "fp8")}


def require_quantizer(kind: str, key: str) -> None:
    """The package that quantizes to `kind` is installed (found, not imported: this runs
    before torch is, for `difftune generate`)."""
    package, extra = QUANTIZERS[kind]
    if importlib.util.find_spec(package) is None:
        raise MissingExtra(f"{key} = {kind!r} needs {package}: pip install 'difftune[{extra}]'")
