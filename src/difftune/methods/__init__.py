"""Training methods, by config name."""

from difftune.methods.base import Method
from difftune.methods.controlnet import ControlNet
from difftune.methods.full import FullFineTune

METHODS: dict[str, Method] = {"controlnet": ControlNet(), "full": FullFineTune()}

__all__ = ["METHODS", "Method"]
