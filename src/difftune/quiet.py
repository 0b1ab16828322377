"""Silence library messages that say nothing about the user's run.

Each filter names one message a dependency prints on every command on a normal install
(seen with the pinned set in constraints.txt); everything else a library says still shows.
"""

from __future__ import annotations

import logging
import warnings

# logger name -> a part of a message that logger repeats on every run
_UNRELATED = {
    # transformers 5 on a machine without torchvision: it falls back to the PIL image
    # processor, which is what difftune wants (it never uses torchvision).
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    # bitsandbytes on a CPU with AVX512-BF16: an optional kernel package is missing; the
    # built-in CPU path is used.
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    # torchao (model.quantize = "fp8"; diffusers imports it whenever it is installed): its
    # wheel's CUDA kernels do not load beside a CPU torch, nor does Triton exist there;
    # fp8 weight-only needs neither. torch itself notes an API change torchao still uses.
    "torchao": "Failed to load",
    "torchao.kernel.intmm": "Detected no triton",
    "torch.utils._pytree": "is an Enum subclass",
    # diffusers 0.42 looks for torchao tensor classes that torchao 0.18 moved, to unpickle
    # torchao-serialized checkpoints, which difftune never loads.
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
}


class _DropMessage(logging.Filter):
    def __init__(self, part: str) -> None:
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in str(record.msg)


def quiet_loading_bars() -> None:
    """No progress bars for reading local weights ("Loading weights", "Loading pipeline
    components"): they flash by in a second and push the run's own lines away. Call it
    where transformers and diffusers are imported anyway."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()


def quiet_unrelated_warnings() -> None:
    for name, part in _UNRELATED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(part))
    # Deprecation notices addressed to library authors, not to someone training a model.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
