"""CPU threads that give way: torch's intra-op thread count follows the cores other
processes leave free (train.cpu_threads = "auto", the default for a one-process CPU run).

Why: torch's OpenMP threads meet at a barrier after every parallel operation, and a
waiting thread spins. With as many threads as cores and one other busy process, one of
them keeps losing its core, and the others spin waiting for it: the demo fell from about
110 to 1.5-5 samples/s beside one busy process on 2 cores, while one thread held about
40. Sleeping instead of spinning (OMP_WAIT_POLICY=PASSIVE) costs more than half the
speed of small operations when the machine is idle (43 against 96 samples/s for the
SDXL fill-circles preset), so the fix is to run fewer threads when, and only while,
the cores are taken.

Every few seconds the governor reads how much CPU time the whole machine used and how
much this process (and its children) used; the difference is the other processes'
demand, in cores. Threads = cores - that demand (at least 1), changed when two readings
in a row agree, and logged as a `threads` event. A launch that fixes its threads
(OMP_NUM_THREADS, as torchrun sets for several processes per machine; or an integer
train.cpu_threads) is left alone, as is a run on an accelerator.
"""

from __future__ import annotations

import os
import time
from typing import Any

import psutil
import torch

INTERVAL_S = 5.0
"""Seconds between readings: long enough to average a few steps, short enough to react."""


def busy_seconds(times: Any) -> float:
    """CPU seconds spent not idle (iowait counts as idle: no core is taken)."""
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


class ThreadGovernor:
    def __init__(self, setting: str | int, device: torch.device, processes: int, events: Any) -> None:
        self.events = events
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # several processes on one machine would each count the others as load
        self.active = (setting == "auto" and device.type == "cpu" and processes == 1
                       and "OMP_NUM_THREADS" not in os.environ)
        self.original = torch.get_num_threads()
        if isinstance(setting, int):
            torch.set_num_threads(setting)
        self.threads = torch.get_num_threads()
        self.process = psutil.Process()
        self.pending: int | None = None
        self.last = self._reading() if self.active and self.cores > 1 else None

    def _reading(self) -> tuple[float, float, float]:
        own = self.process.cpu_times()
        mine = own.user + own.system + own.children_user + own.children_system
        for child in self.process.children(recursive=True):  # live workers are not in children_* yet
            try:
                times = child.cpu_times()
                mine += times.user + times.system
            except psutil.Error:
                continue
        return time.monotonic(), busy_seconds(psutil.cpu_times()), mine

    def after_step(self, step: int) -> None:
        """Called after every optimizer step; reads the machine every INTERVAL_S seconds."""
        if self.last is None or time.monotonic() - self.last[0] < INTERVAL_S:
            return
        now = self._reading()
        elapsed = now[0] - self.last[0]
        others = max(0.0, (now[1] - self.last[1]) - (now[2] - self.last[2])) / elapsed
        self.last = now
        wanted = max(1, min(self.cores, round(self.cores - others)))
        if wanted == self.threads:
            self.pending = None
            return
        if self.pending != wanted:  # one reading could be a blip: wait for a second
            self.pending = wanted
            return
        torch.set_num_threads(wanted)
        self.events.write("threads", step=step, threads=wanted, before=self.threads,
                          other_processes_cores=round(others, 2))
        self.threads, self.pending = wanted, None

    def __enter__(self) -> ThreadGovernor:
        return self

    def __exit__(self, *exc: object) -> None:
        """Give the process back the thread count it had: a later run in the same process
        (the Python API, a test session) must not start from this run's reading."""
        torch.set_num_threads(self.original)
        self.threads = self.original
