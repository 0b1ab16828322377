"""Training methods, by config name; each is built from its [method] section."""

from collections.abc import Callable

from difftune.config import MethodConfig
from difftune.methods.base import Method, Trained
from difftune.methods.control import Control
from difftune.methods.controlnet import ControlNet
from difftune.methods.dreambooth import DreamBooth
from difftune.methods.full import FullFineTune
from difftune.methods.lora import Lora

METHODS: dict[str, Callable[[MethodConfig], Method]] = {
    "controlnet": ControlNet,
    "control": Control,
    "full": FullFineTune,
    "lora": Lora,
    "dreambooth": DreamBooth,
}


def make_method(config: MethodConfig) -> Method:
    return METHODS[config.kind](config)


__all__ = ["METHODS", "Method", "Trained", "make_method"]
