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
}


class _DropMessage(logging.Filter):
    def __init__(self, part: str) -> None:
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in str(record.msg)


def quiet_unrelated_warnings() -> None:
    for name, part in _UNRELATED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(part))
    # Deprecation notices addressed to library authors, not to someone training a model.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
