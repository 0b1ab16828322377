"""Stop signals: SIGTERM or Ctrl+C end a run cleanly, at a step boundary, after a checkpoint.

Imports nothing heavy: the CLI holds these handlers from before torch is imported, so a
signal while the libraries and models load is a stop request like any other.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopSignals:
    """SIGTERM or a first Ctrl+C asks the run to stop after the current step (it then
    checkpoints and exits cleanly); a second Ctrl+C stops at once.

    The CLI holds it from before the models load, so a signal during setup is a request
    like any other (it was lost, or killed the process, before); entering it again (the
    run's own `with`) keeps the same handlers."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        """"SIGTERM" or "SIGINT": what asked the run to stop."""
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def __enter__(self) -> StopSignals:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth:
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(number).name


def stop_requested() -> bool:
    """Whether a stop signal came to this process (checked by long setup work that the
    loop does not run: DreamBooth's class images). Signals belong to the process, so
    this reads the handler installed for SIGTERM, if it is a StopSignals'."""
    handler = signal.getsignal(signal.SIGTERM)
    owner = getattr(handler, "__self__", None)
    return isinstance(owner, StopSignals) and owner.requested
