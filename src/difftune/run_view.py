"""What a run directory shows `difftune watch` (watch.py serves it): the runs found, their
events and curve rows, their facts (config, starts and stops, ETA, checkpoints, final/) and
their validation images, read only from the run folder, which is treated as hostile: no
file outside its validation/ is named for serving (no `..`, no absolute path, no link out).
Standard library only (no torch)."""

from __future__ import annotations

import json
import math
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.data.build.confine import resolves_inside
from difftune.errors import InputError
from difftune.report import floor_grid, run_facts, step_rows, validation_steps
from difftune.rundir import RunDir, read_events

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
"""What is served from a run's validation/: images, nothing else it may hold."""

TEXT_LIMIT = 256 * 1024
"""The most of config.toml or data-check.json shown: a huge file is not a config."""

QUIET_AFTER_S = 600
"""No event for this long and no final/: the run has likely stopped (or is not synced)."""


@dataclass(frozen=True)
class WatchedRun:
    """One run directory given on the command line, as the page names it."""

    index: int
    path: Path
    name: str


# --- which runs ---------------------------------------------------------------------------


def find_runs(given: list[str], here: Path | None = None) -> list[WatchedRun]:
    """The runs to watch: each RUN given (each must be a run directory, with events.jsonl),
    or with none given, the current folder if it is a run, else the runs directly inside
    it, else those inside ./runs (where `difftune demo` writes)."""
    if given:
        paths = [_check_run(value) for value in given]
    else:
        paths = _runs_here(here or Path.cwd())
    unique = list(dict.fromkeys(paths))  # one run given twice is shown once
    names = [path.name for path in unique]
    # Two runs of the same folder name (a/run, b/run) are told apart by their parent.
    return [WatchedRun(index, path, name if names.count(name) == 1 else f"{path.parent.name}/{name}")
            for index, (path, name) in enumerate(zip(unique, names, strict=True))]


def _check_run(value: str) -> Path:
    path = Path(value).expanduser()
    events = RunDir(path).events
    if not events.is_file():
        what = "no such folder" if not path.exists() else "not a folder" if not path.is_dir() else "no events.jsonl"
        raise InputError(f"{value}: not a run directory ({what}); give a folder difftune trained into "
                         "(train.output_dir)")
    if not resolves_inside(path, events):
        raise InputError(f"{value}: events.jsonl is a link to outside the run directory; not read")
    return path.resolve()


def _runs_here(here: Path) -> list[Path]:
    if RunDir(here).events.is_file():
        return [_check_run(str(here))]
    for folder in (here, here / "runs"):
        found = sorted(child.resolve() for child in folder.glob("*")
                       if child.is_dir() and RunDir(child).events.is_file() and resolves_inside(child, RunDir(child).events))
        if found:
            return found
    raise InputError(f"no run directory in {here} or {here / 'runs'}: give one or more RUN folders "
                     "(difftune watch runs/my-run)")


# --- what is read from a run --------------------------------------------------------------


def served_file(run: Path, relative: str) -> Path | None:
    """The image `relative` (a path inside run/validation/, as the URL gives it) names, or
    None when it is not one to serve: empty, absolute, with `.` or `..` parts or a
    backslash, resolving (links followed) outside validation/ (or validation/ outside the
    run), not a regular file, or not an image."""
    if not plain_relative(relative):
        return None
    root = run / "validation"
    if not resolves_inside(run, root):
        return None
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()) or target.suffix.lower() not in IMAGE_TYPES:
        return None
    return target if target.is_file() else None


def plain_relative(relative: str) -> bool:
    """A relative path of plain names: nothing that climbs, roots or hides a separator."""
    if not relative or "\x00" in relative or "\\" in relative or relative.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in relative.split("/"))


def _read_text(run: Path, name: str) -> str | None:
    """A small text file of the run (config.toml, data-check.json), or None when it is
    missing, a link out of the run, not a file, or unreadable."""
    path = run / name
    if not path.is_file() or not resolves_inside(run, path):
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(TEXT_LIMIT)
    except OSError:
        return None


def json_safe(value: Any) -> Any:
    """JSON without NaN or infinity (a browser's JSON.parse refuses them): as null. A
    hand-edited events.jsonl may hold them, though difftune writes null."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_LOGS: dict[Path, tuple[tuple[int, int, int], list[dict[str, Any]]]] = {}
_LOGS_LOCK = threading.Lock()


def run_events(run: Path) -> list[dict[str, Any]]:
    """The run's events (none when events.jsonl is a link out of the run), parsed again
    only when the file changed: every open page asks every couple of seconds, and a long
    run's log is megabytes, read on the machine that trains."""
    path = RunDir(run).events
    if not resolves_inside(run, path):
        return []
    try:
        info = path.stat()
    except OSError:
        return []
    key = (info.st_ino, info.st_size, info.st_mtime_ns)
    with _LOGS_LOCK:
        kept = _LOGS.get(path)
    if kept is not None and kept[0] == key:
        return kept[1]
    events = read_events(run)
    with _LOGS_LOCK:
        _LOGS[path] = (key, events)
    return events


def events_since(run: WatchedRun, since: int) -> dict[str, Any]:
    """The events from the `since`-th on (the page has the ones before), and the curve rows
    of their step events. A log shorter than `since` was replaced (a new run in the same
    folder, or a resync): everything again, with reset set."""
    events = run_events(run.path)
    reset = since > len(events) or since < 0
    since = 0 if reset else since
    rows = step_rows(events)
    # The rows of the events the page already has: the smoothed loss needs the earlier
    # losses, so rows are made from the whole log and the new ones cut off its end.
    known = len(step_rows(events[:since]))
    return json_safe({"total": len(events), "since": since, "reset": reset,
                      "events": events[since:], "rows": rows[known:]})


def facts(run: WatchedRun, now: float | None = None) -> dict[str, Any]:
    """What the page's facts panel shows: the report's fact lines (config.toml read as
    written, every start, stop and resume), the state (step, ETA, how long since the last
    event), the checkpoints/ listing, final/, and the config and data check as text."""
    now = time.time() if now is None else now
    events = run_events(run.path)
    config_text = _read_text(run.path, RunDir.CONFIG)
    try:
        lines = run_facts(events, _parse_toml(config_text))
    except (KeyError, TypeError, ValueError, OverflowError) as error:  # an event edited by hand
        lines = [f"events.jsonl holds an event of an unexpected shape ({type(error).__name__}: {error})"]
    final = RunDir(run.path).final
    kept = sorted(p.name for p in run.path.glob("final-step-*") if p.is_dir())
    return json_safe({
        "name": run.name, "path": str(run.path), "facts": lines, "state": state_line(events, final.is_dir(), now),
        "latest_step": _latest(events, "step").get("step"), "checkpoints": checkpoints(run.path),
        "final": final.is_dir(), "kept_finals": kept, "config": config_text,
        "data_check": data_check_line(_read_text(run.path, "data-check.json")), "time": now})


def _parse_toml(text: str | None) -> dict[str, Any] | None:
    """config.toml as written (no RunConfig: a run from another version or machine still
    shows), or None when missing or not TOML."""
    try:
        return tomllib.loads(text) if text is not None else None
    except tomllib.TOMLDecodeError:
        return None


def _latest(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next((e for e in reversed(events) if e.get("event") == kind), {})


def state_line(events: list[dict[str, Any]], finished: bool, now: float) -> str:
    """Where the run stands, one line: finished, stopped, or its step of max_steps with the
    time left as of its last step event (its eta_s, less the time since); and how long ago
    the last event came, with a note when that is long (the run stopped, or the copy is
    not being synced)."""
    if not events:
        return "no events yet"
    last_time = events[-1].get("time")
    since = now - last_time if isinstance(last_time, (int, float)) else float("nan")
    ago = f"last event {duration(since)} ago" if math.isfinite(since) else "last event at an unknown time"
    final = _latest(events, "final")
    if finished and final:
        return f"finished: final/ written at step {final.get('step')}; {ago}"
    step, start = _latest(events, "step"), _latest(events, "start")
    at = step.get("step", start.get("step", 0))
    line = f"step {at} of {start.get('max_steps', '?')}"
    if _position(events, "stopped") > _position(events, "start"):  # stopped since its last (re)start
        return f"{line}; stopped ({_latest(events, 'stopped').get('reason') or 'signal'}); {ago}"
    eta, written = step.get("eta_s"), step.get("time")
    if isinstance(eta, (int, float)) and isinstance(written, (int, float)) and math.isfinite(eta):
        line += f"; about {duration(max(0.0, eta - (now - written)))} left (estimated at step {at})"
    if math.isfinite(since) and since > QUIET_AFTER_S:
        return f"{line}; {ago}: stopped, or not synced lately"
    return f"{line}; {ago}"


def _position(events: list[dict[str, Any]], kind: str) -> int:
    """Where the last event of a kind is in the log (-1: none)."""
    return max((i for i, e in enumerate(events) if e.get("event") == kind), default=-1)


def duration(seconds: float) -> str:
    """A short, readable length of time: 45 s, 12 min, 3 h 05 min, 2 d 4 h."""
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def checkpoints(run: Path) -> list[str]:
    """checkpoints/step-NNNNNN/ by name, oldest first; one without its COMPLETE marker (being
    written, or cut short) says so."""
    folder = run / "checkpoints"
    if not folder.is_dir() or not resolves_inside(run, folder):
        return []
    names = []
    for child in sorted(folder.glob("step-*")):
        if child.is_dir():
            names.append(child.name if (child / "COMPLETE").is_file() else f"{child.name} (incomplete)")
    return names


def data_check_line(text: str | None) -> str | None:
    """data-check.json in a line: rows checked and bad rows."""
    try:
        report = json.loads(text) if text else None
    except ValueError:
        return "data-check.json: not readable JSON"
    if not isinstance(report, dict):
        return None
    bad = report.get("bad_rows")
    bad_count = len(bad) if isinstance(bad, list) else "?"
    how = "every file read" if report.get("full") else "headers only"
    return f"data check: {report.get('rows', '?')} rows, {bad_count} bad ({how})"


def validation(run: WatchedRun) -> dict[str, Any]:
    """Each validation step with its images (as URLs the server serves), the prompt of each
    grid, and the floor grid; only files `served_file` would serve are listed. A URL ends
    in ?m=<mtime>, so an image rewritten in place (a resumed run validating that step
    again) is fetched anew."""
    def url(path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            relative = path.relative_to(run.path / "validation").as_posix()
        except ValueError:
            return None
        served = served_file(run.path, relative)
        if served is None:
            return None
        return f"/run/{run.index}/validation/{relative}?m={served.stat().st_mtime_ns}"

    steps = []
    if resolves_inside(run.path, run.path / "validation"):
        for found in validation_steps(run.path):
            grids = [{"url": url(grid["file"]), "prompt": grid["prompt"]} for grid in found["grids"]]
            grids = [grid for grid in grids if grid["url"]]
            metric = url(found["metric_grid"])
            if grids or metric:
                steps.append({"name": found["name"], "step": found["step"], "grids": grids, "metric_grid": metric})
    floor = url(floor_grid(run.path)) if resolves_inside(run.path, run.path / "validation") else None
    return {"steps": steps, "floor": floor}


# --- serving ------------------------------------------------------------------------------
