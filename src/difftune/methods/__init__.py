"""Training methods, by config name."""

from difftune.methods.base import Method
from difftune.methods.controlnet import ControlNet

METHODS: dict[str, Method] = {"controlnet": ControlNet()}

__all__ = ["METHODS", "Method"]
