"""Training methods: each is a folder here, methods/<kind>/, holding spec.py (SPEC: its
[method] settings, traits and needs, which the catalog lists without loading torch) and
method.py (its code, built from the settings by the spec's factory when a run starts).

A new method is one folder here (and its presets in configs/); nothing else names it.
The seam it implements is methods.base.Method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difftune.methods.base import Method
    from difftune.method_settings import MethodSettings


def make_method(settings: MethodSettings) -> Method:
    """The method of a run's [method] settings, its code imported now."""
    from difftune.catalog import methods

    return methods()[settings.kind].make(settings)


__all__ = ["make_method"]
