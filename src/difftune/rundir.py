"""The run directory's layout, owned in one place: where each part of a run lives, the one
answer to "is this a difftune run", and the readers every verb shares (its events, its
config, its result). Standard library only, so anything may import it: the trainer, the
report, `generate`, `export` and the family checks.

    RUN/
      events.jsonl  config.toml  data-check.json  report.html  .lock
      checkpoints/step-NNNNNN/   validation/   logs/   final/   final-step-N/
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_TEXT = "pid "
"""How the lock file difftune writes begins (a lock file of another tool is not ours)."""


@dataclass(frozen=True)
class RunDir:
    """A folder that is, or will be, one run's directory."""

    path: Path

    EVENTS = "events.jsonl"
    CONFIG = "config.toml"
    LOCK = ".lock"
    FINAL = "final"
    ENTRIES = {LOCK: "file", CONFIG: "file", EVENTS: "file", "data-check.json": "file", "report.html": "file",
               "checkpoints": "folder", "validation": "folder", "logs": "folder", FINAL: "folder"}
    """What a run directory holds, and of which kind: anything else of these names is not ours."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @property
    def events(self) -> Path:
        return self.path / self.EVENTS

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def lock(self) -> Path:
        return self.path / self.LOCK

    @property
    def final(self) -> Path:
        return self.path / self.FINAL

    def kept_final(self, step: int) -> Path:
        """Where a final/ written at `step` is kept when a longer run replaces it."""
        return self.path / f"final-step-{step:06d}"

    def is_run(self) -> bool:
        """A folder difftune made for a run: its events log, or its own lock file (a run
        stopped before its first event). Another tool's checkpoints/ or config.toml are not."""
        if self.events.is_file():
            return True
        try:
            return self.lock.read_text(errors="replace").startswith(LOCK_TEXT)
        except OSError:
            return False

    def result(self) -> Path | None:
        """final/, once the run has written it."""
        return self.final if self.is_run() and self.final.is_dir() else None

    def unfinished(self) -> bool:
        """A run that has started (its events and config are there) but has no final/ yet."""
        return self.events.is_file() and self.config_file.is_file() and not self.final.is_dir()

    def read_config(self) -> dict[str, Any] | None:
        """The run's config.toml as written, or None when it cannot be read."""
        try:
            return tomllib.loads(self.config_file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError):
            return None

    def read_events(self) -> list[dict[str, Any]]:
        """The events, oldest first. A line that is not a JSON object (cut short by a kill or
        a full disk, or edited by hand) is left out: the log is for reading, never a reason
        to stop a run."""
        if not self.events.is_file():
            return []
        events = []
        for line in self.events.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                events.append(event)
        return events


def run_of(path: str | Path) -> RunDir | None:
    """The run a path is: the run directory itself, or a folder in it (final/, a kept
    final-step-N/); a run is one with its events log and config."""
    folder = Path(path).expanduser()
    for candidate in (RunDir(folder), RunDir(folder.parent)):
        if candidate.events.is_file() and candidate.config_file.is_file():
            return candidate
    return None


def run_config(path: str | Path | None) -> dict[str, Any] | None:
    """The config.toml of the run a path is (see `run_of`), or None."""
    run = run_of(path) if path is not None else None
    return run.read_config() if run is not None else None


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's events, oldest first (RunDir.read_events)."""
    return RunDir(Path(run_dir)).read_events()


def stands_for(path: Path) -> Path:
    """A finished run directory stands for its final/; any other path for itself."""
    result = RunDir(path).result()
    return result if result is not None else path


def model_source(value: str) -> str:
    """A model given by a flag or key: a finished run directory stands for its final/; a
    folder, a file or a Hub id is returned as given."""
    return str(stands_for(Path(value).expanduser())) if Path(value).expanduser().is_dir() else value
