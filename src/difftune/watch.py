"""`difftune watch`: a local, read-only web page over one or more run directories, served
while they train.

It reads only what a run writes into its directory (events.jsonl, validation/,
config.toml, data-check.json, the names in checkpoints/ and whether final/ is there), so
a finished run, or one synced from another machine, shows the same as a live one. The
page (watch_static/index.html and watch.js, charts by the vendored uPlot) polls the JSON
endpoints every couple of seconds:

    GET /api/runs                          the runs watched, by index
    GET /api/run/<i>/events?since=N        events from the N-th on, and their curve rows
    GET /api/run/<i>/facts                 config, starts and stops, ETA, checkpoints, final/
    GET /api/run/<i>/validation            each validation step's images with their prompts
    GET /run/<i>/validation/<file>         an image, from inside that run's validation/ only

A run folder may come from anywhere, so it is treated as hostile: no file outside its
validation/ is served (no `..`, no absolute path, no link out), text goes to the page as
JSON (the page sets it as text, never as HTML), and nothing is written. Standard library
only (no torch), so it starts in well under a second beside a training run.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from difftune.errors import InputError
from difftune.report import floor_grid, run_facts, step_rows, validation_steps
from difftune.rundir import RunDir, read_events

DEFAULT_PORT = 7860
POLL_MS = 2000
"""How often the page asks for news: a step event comes every train.log_every steps."""

STATIC = Path(__file__).with_name("watch_static")
STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "watch.js": "text/javascript; charset=utf-8",
                "uPlot.iife.min.js": "text/javascript; charset=utf-8", "uPlot.min.css": "text/css; charset=utf-8",
                "uPlot.LICENSE": "text/plain; charset=utf-8"}
"""The page's own files: only these names are served from watch_static/."""

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
"""What is served from a run's validation/: images, nothing else it may hold."""

TEXT_LIMIT = 256 * 1024
"""The most of config.toml or data-check.json shown: a huge file is not a config."""

QUIET_AFTER_S = 600
"""No event for this long and no final/: the run has likely stopped (or is not synced)."""

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Our scripts only: a prompt or path from a run can never run as script in the page.
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


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
    if not _inside(path, events):
        raise InputError(f"{value}: events.jsonl is a link to outside the run directory; not read")
    return path.resolve()


def _runs_here(here: Path) -> list[Path]:
    if RunDir(here).events.is_file():
        return [_check_run(str(here))]
    for folder in (here, here / "runs"):
        found = sorted(child.resolve() for child in folder.glob("*")
                       if child.is_dir() and RunDir(child).events.is_file() and _inside(child, RunDir(child).events))
        if found:
            return found
    raise InputError(f"no run directory in {here} or {here / 'runs'}: give one or more RUN folders "
                     "(difftune watch runs/my-run)")


# --- what is read from a run --------------------------------------------------------------


def _inside(folder: Path, path: Path) -> bool:
    """Whether `path`, every link in it followed, lies within `folder` (resolved the same
    way): a hostile run folder may hold a link to a file of the user's elsewhere."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def served_file(run: Path, relative: str) -> Path | None:
    """The image `relative` (a path inside run/validation/, as the URL gives it) names, or
    None when it is not one to serve: empty, absolute, with `.` or `..` parts or a
    backslash, resolving (links followed) outside validation/ (or validation/ outside the
    run), not a regular file, or not an image."""
    if not _plain_relative(relative):
        return None
    root = run / "validation"
    if not _inside(run, root):
        return None
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()) or target.suffix.lower() not in IMAGE_TYPES:
        return None
    return target if target.is_file() else None


def _plain_relative(relative: str) -> bool:
    """A relative path of plain names: nothing that climbs, roots or hides a separator."""
    if not relative or "\x00" in relative or "\\" in relative or relative.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in relative.split("/"))


def _read_text(run: Path, name: str) -> str | None:
    """A small text file of the run (config.toml, data-check.json), or None when it is
    missing, a link out of the run, not a file, or unreadable."""
    path = run / name
    if not path.is_file() or not _inside(run, path):
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
    if not _inside(run, path):
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
    if not folder.is_dir() or not _inside(run, folder):
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
    if _inside(run.path, run.path / "validation"):
        for found in validation_steps(run.path):
            grids = [{"url": url(grid["file"]), "prompt": grid["prompt"]} for grid in found["grids"]]
            grids = [grid for grid in grids if grid["url"]]
            metric = url(found["metric_grid"])
            if grids or metric:
                steps.append({"name": found["name"], "step": found["step"], "grids": grids, "metric_grid": metric})
    floor = url(floor_grid(run.path)) if _inside(run.path, run.path / "validation") else None
    return {"steps": steps, "floor": floor}


# --- serving ------------------------------------------------------------------------------


class WatchServer(ThreadingHTTPServer):
    """The runs and the hosts a request may name (see Handler.host_allowed)."""

    daemon_threads = True  # a browser's open connection never holds up Ctrl+C

    def __init__(self, address: tuple[str, int], runs: list[WatchedRun]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.runs = runs
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


ROUTE = re.compile(r"^/api/run/(\d{1,6})/(events|facts|validation)$")
FILE_ROUTE = re.compile(r"^/run/(\d{1,6})/validation/(.+)$")


class Handler(BaseHTTPRequestHandler):
    """GET and HEAD only; every answer is JSON, one of the page's files, or an image from a
    run's validation/."""

    server: WatchServer
    server_version = "difftune-watch"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8",
                   True, {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: the page asks every couple of seconds, and the terminal is for the URL."""

    def _answer(self, send_body: bool) -> None:
        if not self.host_allowed():
            self._error(HTTPStatus.FORBIDDEN, "unexpected Host header", send_body)
            return
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        try:
            self._route(path, query, send_body)
        except (BrokenPipeError, ConnectionResetError):  # the browser went away mid-answer
            pass
        except Exception as error:  # noqa: BLE001 (one odd file must not stop the page: say it, go on)
            sys.stderr.write(f"difftune watch: {self.path}: {type(error).__name__}: {error}\n")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, type(error).__name__, send_body)

    def _route(self, path: str, query: dict[str, list[str]], send_body: bool) -> None:
        if path in ("/", "/index.html"):
            self._static("index.html", send_body)
        elif path.startswith("/static/"):
            self._static(path.removeprefix("/static/"), send_body)
        elif path == "/api/runs":
            self._json({"runs": [{"index": r.index, "name": r.name, "path": str(r.path)} for r in self.server.runs],
                        "poll_ms": POLL_MS}, send_body)
        elif match := ROUTE.match(path):
            run = self._run(match.group(1), send_body)
            if run is None:
                return
            if match.group(2) == "events":
                since = query.get("since", ["0"])[0]
                if not since.isdigit():
                    self._error(HTTPStatus.BAD_REQUEST, "since: a whole number of events", send_body)
                    return
                self._json(events_since(run, int(since)), send_body)
            else:
                self._json(facts(run) if match.group(2) == "facts" else validation(run), send_body)
        elif match := FILE_ROUTE.match(path):
            run = self._run(match.group(1), send_body)
            if run is not None:
                self._image(run, match.group(2), send_body)
        else:
            self._error(HTTPStatus.NOT_FOUND, "no such page", send_body)

    def host_allowed(self) -> bool:
        """Bound to a loopback address, answer only requests that name this machine: a web
        page elsewhere could otherwise point a name of its own at 127.0.0.1 (DNS rebinding)
        and read the runs. A server bound elsewhere (--host) was opened on purpose."""
        if not _loopback(self.server.server_address[0]):
            return True
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host  # a port after a name or IPv4
        if name.startswith("[") and "]" in name:  # [::1]:port
            name = name[1:name.index("]")]
        return name.lower() == "localhost" or _loopback(name)

    def _run(self, index: str, send_body: bool) -> WatchedRun | None:
        runs = self.server.runs
        if int(index) >= len(runs):
            self._error(HTTPStatus.NOT_FOUND, "no such run", send_body)
            return None
        return runs[int(index)]

    def _static(self, name: str, send_body: bool) -> None:
        if name not in STATIC_TYPES:  # by name only: no path reaches the file system
            self._error(HTTPStatus.NOT_FOUND, "no such file", send_body)
            return
        self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), STATIC_TYPES[name], send_body)

    def _image(self, run: WatchedRun, relative: str, send_body: bool) -> None:
        if not _plain_relative(relative):
            self._error(HTTPStatus.FORBIDDEN, "only plain paths inside the run's validation/", send_body)
            return
        target = served_file(run.path, relative)
        if target is None:
            root = run.path / "validation"
            escapes = not _inside(run.path, root) or not _inside(root, root / relative)
            status = HTTPStatus.FORBIDDEN if escapes else HTTPStatus.NOT_FOUND
            self._error(status, "outside the run's validation/" if escapes else "no such image", send_body)
            return
        try:
            # O_NOFOLLOW: a file swapped for a link after the check above is not followed.
            handle = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with open(handle, "rb") as file:
                body = file.read()
        except OSError:
            self._error(HTTPStatus.NOT_FOUND, "no such image", send_body)
            return
        self._send(HTTPStatus.OK, body, IMAGE_TYPES[target.suffix.lower()], send_body,
                   {"Cache-Control": "private, max-age=3600"})  # a new mtime makes a new URL

    def _json(self, value: Any, send_body: bool) -> None:
        self._send(HTTPStatus.OK, json.dumps(value, allow_nan=False).encode(), "application/json", send_body)

    def _error(self, status: HTTPStatus, message: str, send_body: bool) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json", send_body)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, send_body: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                   **SECURITY_HEADERS, **(extra or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(runs: list[WatchedRun], host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> WatchServer:
    """A server bound to host:port (0: any free port), not yet serving."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port {port}: give 0 to 65535 (0: any free port)")
    try:
        return WatchServer((host, port), runs)
    except OSError as error:
        raise InputError(f"cannot serve on {host}:{port} ({error.strerror or error}): give another --port, "
                         "or --port 0 for any free one") from None


def _say(line: str) -> None:
    print(line, flush=True)  # at once, also into a pipe or a log file


def serve(given: list[str], host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          say: Callable[[str], None] = _say) -> int:
    """Check the runs (a RUN that is not one stops here, before serving), bind, say the
    URL, and serve until Ctrl+C."""
    runs = find_runs(given)
    server = make_server(runs, host, port)
    if not _loopback(host):
        say(f"warning: serving on {host}, not this machine only: anyone who can reach it on port "
            f"{server.server_address[1]} can read these runs' events, config and validation images")
    names = ", ".join(str(run.path) for run in runs)
    say(f"watching {len(runs)} run(s) ({names}) at {server.url} (read-only; Ctrl+C to stop)")
    with server:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            say("stopped")
    return 0
