"""Validation during a run, on the main process: the images of the fixed pairs, the
control metric on the held-out set (and once per run its floor, control off), their
event, tracker logs and the report. The loop brings the weights (averaged, gathered when
sharded) and keeps every rank in step; this file decides what is generated and kept."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from difftune.config import RunConfig
from difftune.report import write_report
from difftune.scoring import MetricSet, score_control
from difftune.training.events import EventLog
from difftune.training.step import Trainee
from difftune.validation import ValidationPair, log_to_trackers, run_validation


def metrics_line(step: int, metrics: dict[str, float], floor: dict[str, float] | None) -> str:
    """"validation at step N: shape_iou 0.806 (floor 0.474), ...": what the terminal and a
    log file show of each validation's scores."""
    shown = []
    for name, value in metrics.items():
        base = (floor or {}).get(name)
        shown.append(f"{name} {number(value)}" + (f" (floor {number(base)})" if base is not None else ""))
    return f"validation at step {step}: " + ", ".join(shown)


def number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)


class Validation:
    def __init__(self, config: RunConfig, run_dir: Path, pairs: list[ValidationPair], metric_set: MetricSet | None,
                 accelerator: Accelerator, events: EventLog, stopping: Callable[[], bool],
                 say: Callable[[str], None] = lambda line: None) -> None:
        self.config, self.run_dir, self.pairs, self.metric_set = config, run_dir, pairs, metric_set
        self.accelerator, self.events, self.stopping, self.say = accelerator, events, stopping, say
        self.floor: dict[str, float] | None = None

    @property
    def wanted(self) -> bool:
        """Anything to generate: validation pairs or a metric set."""
        return bool(self.pairs) or self.metric_set is not None

    def at_step(self, step: int, trainee: Trainee, parts: Any, trained: dict[str, torch.nn.Module],
                show: Callable[..., None]) -> None:
        """Generate, score and log at `step` (the main process; the weights are whole)."""
        started = time.perf_counter()
        show(status="validating")
        out_dir = self.run_dir / "validation" / f"step-{step:06d}"
        results = run_validation(trainee.family, parts, trainee.method, trained, self.pairs, self.config, out_dir,
                                 self.stopping)
        scores = {} if self.stopping() else self._score(trainee, parts, trained, out_dir, step)
        log_to_trackers(self.accelerator.trackers, results, step)
        self.events.write("validation", step=step, path=str(out_dir), pairs=len(results),
                          seconds=round(time.perf_counter() - started, 2), interrupted=self.stopping(), **scores)
        write_report(self.run_dir, self.config)
        if scores.get("metrics"):
            self.say(metrics_line(step, scores["metrics"], scores.get("floor")))
        show(status="")

    def _score(self, trainee: Trainee, parts: Any, trained: dict[str, torch.nn.Module], out_dir: Path,
               step: int) -> dict[str, Any]:
        """Control metric on the held-out set, and once per run its floor (control off)."""
        if self.metric_set is None:
            return {}
        floor_settings = trainee.method.floor_settings
        args = (trainee.family, parts, trainee.method, trained, self.metric_set, self.config)
        metrics = score_control(*args, out_dir, should_stop=self.stopping)
        if self.floor is None and floor_settings is not None and not self.stopping():
            self.floor = score_control(*args, self.run_dir / "validation" / "floor", floor_settings,
                                       should_stop=self.stopping)
        logged = {f"validation/{k}": v for k, v in metrics.items()}
        logged |= {f"validation/floor_{k}": v for k, v in (self.floor or {}).items()}
        self.accelerator.log(logged, step=step)
        return {"metrics": metrics, "floor": self.floor}
