"""What a run tells: events.jsonl lines, tracker scalars and a terminal progress bar."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or peak resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Throughput:
    """Samples per second, smoothed, and the time left at that rate."""

    def __init__(self, smoothing: float = 0.9) -> None:
        self.smoothing = smoothing
        self.rate: float | None = None
        self.last = time.perf_counter()

    def update(self, samples: int) -> float:
        now = time.perf_counter()
        rate = samples / max(now - self.last, 1e-9)
        self.last = now
        self.rate = rate if self.rate is None else self.smoothing * self.rate + (1 - self.smoothing) * rate
        return self.rate

    def restart(self) -> None:
        """Forget the clock after a pause (validation, checkpoint) so it isn't counted."""
        self.last = time.perf_counter()


class EventLog:
    """Appends one JSON object per line to events.jsonl, on the main process only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / "events.jsonl"
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


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[rate]:.1f} samples/s"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )
