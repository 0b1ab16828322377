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
import os
import re
import socket
import sys
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from difftune.data.build.confine import resolves_inside
from difftune.errors import InputError
from difftune.run_view import (
    IMAGE_TYPES,
    WatchedRun,
    events_since,
    facts,
    find_runs,
    plain_relative,
    served_file,
    validation,
)

DEFAULT_PORT = 7860
POLL_MS = 2000
"""How often the page asks for news: a step event comes every train.log_every steps."""

STATIC = Path(__file__).with_name("watch_static")
STATIC_TYPES = {"index.html": "text/html; charset=utf-8", "watch.js": "text/javascript; charset=utf-8",
                "uPlot.iife.min.js": "text/javascript; charset=utf-8", "uPlot.min.css": "text/css; charset=utf-8",
                "uPlot.LICENSE": "text/plain; charset=utf-8"}
"""The page's own files: only these names are served from watch_static/."""

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Our scripts only: a prompt or path from a run can never run as script in the page.
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


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
        if not plain_relative(relative):
            self._error(HTTPStatus.FORBIDDEN, "only plain paths inside the run's validation/", send_body)
            return
        target = served_file(run.path, relative)
        if target is None:
            root = run.path / "validation"
            escapes = not resolves_inside(run.path, root) or not resolves_inside(root, root / relative)
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
