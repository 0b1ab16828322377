"""What a run tells: events.jsonl lines, tracker scalars and a terminal progress bar."""

from __future__ import annotations

import ctypes
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from difftune.rundir import RunDir, read_events  # noqa: F401 (the run directory owns its log's reading)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or peak resident memory of this process on CPU."""
    if device.type != "cpu" and torch.accelerator.is_available():
        return torch.accelerator.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Throughput:
    """Samples per second, smoothed, and the time left, counting training time only
    (validation and checkpoints are pauses: `restart` after each)."""

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self.rate: float | None = None
        self.last = time.perf_counter()
        self.active = 0.0
        """Seconds spent in steps this session (pauses left out)."""
        self.steps = 0

    def update(self, samples: int) -> float:
        now = time.perf_counter()
        elapsed = max(now - self.last, 1e-9)
        rate = samples / elapsed
        self.last = now
        self.active += elapsed
        self.steps += 1
        self.rate = rate if self.rate is None else self.smoothing * self.rate + (1 - self.smoothing) * rate
        return self.rate

    def restart(self) -> None:
        """Forget the clock after a pause (validation, checkpoint) so it isn't counted."""
        self.last = time.perf_counter()

    def eta(self, steps_left: int) -> float:
        """Seconds to go at this session's mean step time (pauses left out): a mean over
        the session does not swing with one slow step the way the smoothed rate does."""
        if self.steps == 0:
            return float("nan")
        return steps_left * self.active / self.steps


class LossWindow:
    """The mean of the last losses (each step draws other timesteps, so one step's loss
    says little)."""

    def __init__(self, size: int = 20) -> None:
        self.size = size
        self.values: list[float] = []

    def add(self, loss: float) -> float:
        if math.isfinite(loss):
            self.values = (self.values + [loss])[-self.size :]
        return sum(self.values) / len(self.values) if self.values else float("nan")


class EventLog:
    """Appends one JSON object per line to events.jsonl, on the main process only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = RunDir(run_dir).events
        self.enabled = enabled

    def write(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        record = {"event": kind, "time": round(time.time(), 3), **_json_safe(fields)}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: such values (a skipped step's loss) become null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class PlainProgress:
    """The progress bar's lines where no terminal shows a bar (a log file, nohup, slurm, CI):
    one plain line every `every` steps and at the last (step N/M, the mean loss, samples/s,
    time left), and each status as it starts (validating, saving). Takes the calls a rich
    Progress takes from the loop."""

    def __init__(self, console: Console, every: int) -> None:
        self.console, self.every = console, max(1, every)
        self.total, self.completed, self.fields = 0, 0, {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, name: str, total: int, completed: int = 0, **fields: Any) -> int:
        self.total, self.completed, self.fields = total, completed, fields
        return 0

    def update(self, task: int, advance: int = 0, **fields: Any) -> None:
        status = fields.get("status")
        self.fields |= fields
        if status:
            self.console.print(f"step {self.completed}/{self.total}: {status}", highlight=False)
        if not advance:
            return
        self.completed += advance
        if self.completed % self.every == 0 or self.completed >= self.total:
            shown = self.fields
            self.console.print(f"step {self.completed}/{self.total}  loss {shown['loss']}  "
                               f"{shown['rate']:.1f} samples/s  {shown['eta']}", highlight=False)


def progress_bar(console: Console, enabled: bool, every: int = 1) -> Progress | PlainProgress:
    """step N/M, the mean loss of the last 20 steps, samples/s, time left (training time
    only), and what the run is doing between steps (validating, saving); plain lines every
    `every` steps where the console is no terminal."""
    if enabled and not console.is_terminal:
        return PlainProgress(console, every)
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[rate]:.1f} samples/s  {task.fields[eta]}"),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=not enabled,
    )


def duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-:--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} left"


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks of up to 32 MB in
    its heap (most of a UNet's tensors), so without this the resident size stays at its
    peak after the optimizer state is freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def tracker_hyperparameters(config: Any) -> dict[str, Any]:
    """Scalar hyperparameters for trackers (tensorboard stores no lists)."""
    flat = {}
    for section, values in config.model_dump().items():
        for key, value in values.items():
            if isinstance(value, (bool, int, float, str)):
                flat[f"{section}.{key}"] = value
    return flat
