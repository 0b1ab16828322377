"""`difftune watch`: its JSON endpoints over a real run, files served only from inside a
run's validation/, and the page in a real headless browser, updating while a run goes on."""

from __future__ import annotations

import html
import http.client
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_run, run_config

import difftune.watch as watch
from difftune.cli import main

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def watched_run(tiny_base: Path, circles: Path, held_out: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step ControlNet run, validated (images, prompt, metric and floor) at
    steps 2 and 4, a step event every step (copy it to change it)."""
    from difftune.config import build_config
    from difftune.training.loop import train

    out = tmp_path_factory.mktemp("watched") / "run"
    raw = run_config(tiny_base, circles, out, held_out, train={"log_every": 1})
    raw["validation"] |= {"metric": "fill_circles", "metric_data": str(held_out), "metric_samples": 2}
    train(build_config(raw))
    return out


@pytest.fixture
def run(watched_run: Path, tmp_path: Path) -> Path:
    return copy_run(watched_run, tmp_path)


class Served:
    """A watch server on a free port in a thread; `get` asks it like a browser would."""

    def __init__(self, runs: list[Path]) -> None:
        self.server = watch.make_server(watch.find_runs([str(r) for r in runs]), "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def get(self, path: str, method: str = "GET", host: str | None = None) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Host": host} if host else {}
        connection.request(method, path, headers=headers)  # the path goes as it is: no `..` folded away
        answer = connection.getresponse()
        body = answer.read()
        connection.close()
        return answer.status, dict(answer.getheaders()), body

    def json(self, path: str) -> Any:
        status, headers, body = self.get(path)
        assert status == 200 and headers["Content-Type"] == "application/json", (path, status, body)
        return json.loads(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Served] = []

    def start(*runs: Path) -> Served:
        started.append(Served(list(runs)))
        return started[-1]

    yield start
    for served in started:
        served.close()


def _append_steps(run: Path, steps: range, validated: int | None = None) -> None:
    """The run goes on: step events (in the shape the loop writes) and, at `validated`, a
    new validation folder (step 4's images again) and its event."""
    events = [{"event": "step", "time": time.time(), "step": step, "epoch": 1, "loss": 0.5 + 0.01 * step,
               "lr": 0.001, "samples_per_s": 12.0, "eta_s": 30.0, "peak_memory_mb": 650.0} for step in steps]
    if validated is not None:
        folder = run / "validation" / f"step-{validated:06d}"
        shutil.copytree(run / "validation" / "step-000004", folder)
        events.append({"event": "validation", "time": time.time(), "step": validated, "path": str(folder),
                       "pairs": 1, "seconds": 0.4, "interrupted": False,
                       "metrics": {"colour_iou": 0.5, "control_iou": 0.6},
                       "floor": {"colour_iou": 0.1, "control_iou": 0.1}})
    with open(run / "events.jsonl", "a") as handle:
        handle.writelines(json.dumps(event) + "\n" for event in events)


# --- the command line ---------------------------------------------------------------------


def test_a_folder_that_is_not_a_run_is_named_before_serving(run: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "nowhere"):
        assert main(["watch", str(run), str(bad), "--port", "0"]) == 2
        error = capsys.readouterr().err
        assert f"{bad}: not a run directory" in error
        assert len(error.strip().splitlines()) == 1 and "watching" not in error
    assert main(["watch", str(run), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err


def test_two_runs_of_one_folder_name_are_told_apart(run: Path, tmp_path: Path) -> None:
    other = copy_run(run, tmp_path / "other")
    runs = watch.find_runs([str(run), str(other), str(run)])  # the same run twice: shown once
    assert [r.name for r in runs] == [f"{run.parent.name}/run", "other/run"]


# --- the JSON endpoints ---------------------------------------------------------------------


def test_endpoints_show_the_run_and_poll_only_what_is_new(run: Path, serve) -> None:
    served = serve(run)
    assert served.json("/api/runs")["runs"] == [{"index": 0, "name": "run", "path": str(run.resolve())}]

    first = served.json("/api/run/0/events?since=0")
    kinds = [e["event"] for e in first["events"]]
    assert first["total"] == len(kinds) and not first["reset"]
    assert kinds.count("step") == 4 and kinds.count("validation") == 2 and "final" in kinds
    assert [row["step"] for row in first["rows"]] == [1, 2, 3, 4]
    assert first["rows"][1]["smoothed"] == pytest.approx((first["rows"][0]["loss"] + first["rows"][1]["loss"]) / 2)

    # Polling: nothing new, then only the new events, and the rows of their steps.
    assert served.json(f"/api/run/0/events?since={first['total']}")["events"] == []
    _append_steps(run, range(5, 7), validated=6)
    news = served.json(f"/api/run/0/events?since={first['total']}")
    assert [e["event"] for e in news["events"]] == ["step", "step", "validation"]
    assert [row["step"] for row in news["rows"]] == [5, 6] and news["total"] == first["total"] + 3
    losses = [row["loss"] for row in first["rows"] + news["rows"]]
    assert news["rows"][-1]["smoothed"] == pytest.approx(sum(losses) / len(losses))  # smoothed over all six
    # A log shorter than what the page has was replaced: everything again.
    assert served.json("/api/run/0/events?since=999")["reset"] is True
    assert served.get("/api/run/0/events?since=-1")[0] == 400 and served.get("/api/run/1/events")[0] == 404

    facts = served.json("/api/run/0/facts")
    assert facts["latest_step"] == 6 and facts["final"] is True
    assert facts["checkpoints"] == ["step-000002", "step-000004"]
    assert any(line.startswith("method: controlnet; base:") for line in facts["facts"])
    assert facts["config"].startswith("[model]") and "12 rows, 0 bad" in facts["data_check"]
    assert facts["state"].startswith("finished: final/ written at step 4")

    found = served.json("/api/run/0/validation")
    assert [s["step"] for s in found["steps"]] == [2, 4, 6] and found["floor"].startswith("/run/0/validation/floor/")
    newest = found["steps"][-1]
    assert newest["grids"][0]["prompt"] == "red circle with blue background"
    status, headers, body = served.get(newest["grids"][0]["url"])
    assert status == 200 and headers["Content-Type"] == "image/png" and body.startswith(b"\x89PNG")
    assert body == (run / "validation" / "step-000006" / "pair-00-grid.png").read_bytes()
    status, headers, body = served.get(newest["metric_grid"], "HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0

    status, headers, page = served.get("/")
    assert status == 200 and b"/static/uPlot.iife.min.js" in page and "script-src 'self'" in \
        headers["Content-Security-Policy"]
    assert served.get("/static/uPlot.iife.min.js")[0] == 200 and served.get("/static/watch.js")[0] == 200


def test_a_run_still_training_shows_its_step_and_time_left(run: Path, serve) -> None:
    shutil.rmtree(run / "final")
    lines = [line for line in (run / "events.jsonl").read_text().splitlines() if '"event": "final"' not in line]
    (run / "events.jsonl").write_text("\n".join(lines) + "\n")
    _append_steps(run, range(5, 6))
    state = serve(run).json("/api/run/0/facts")["state"]
    assert re.match(r"step 5 of 4; about \d+ s left \(estimated at step 5\); last event \d+ s ago$", state), state


def test_only_files_inside_validation_are_served(run: Path, tmp_path: Path, serve) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    validation = run / "validation"
    (validation / "step-000004" / "link.png").symlink_to(secret)
    (validation / "step-000009").symlink_to(tmp_path, target_is_directory=True)  # a folder linked out
    served = serve(run)
    for path in ("/run/0/validation/../config.toml", "/run/0/validation/%2e%2e/config.toml",
                 "/run/0/validation/step-000004/../../events.jsonl", "/run/0/validation//etc/passwd",
                 f"/run/0/validation/{secret}", "/run/0/validation/%2F" + str(secret).lstrip("/"),
                 "/run/0/validation/step-000004/link.png", "/run/0/validation/step-000009/secret.png",
                 "/run/0/validation/step-000004\\..\\..\\config.toml"):
        status, _, body = served.get(path)
        assert status in (403, 404) and b"not yours" not in body, (path, status)
    assert served.get("/run/0/validation/step-000004/link.png")[0] == 403
    assert served.get("/run/0/validation/step-000004/prompts.json")[0] == 404  # images only
    assert served.get("/run/0/validation/step-000004/none.png")[0] == 404
    assert served.get("/static/../watch.py")[0] == 404 and served.get("/static/uPlot.d.ts")[0] == 404
    listed = json.dumps(served.json("/api/run/0/validation"))
    assert "step-000009" not in listed and "link.png" not in listed
    # Read-only; and a page elsewhere naming itself 127.0.0.1 by DNS (rebinding) is refused.
    assert served.get("/api/runs", "POST")[0] == 405 and served.get("/api/runs", "DELETE")[0] == 405
    assert served.get("/api/runs", host="evil.example:80")[0] == 403
    assert served.get("/api/runs", host=f"localhost:{served.port}")[0] == 200


def test_a_folder_linked_out_as_validation_is_not_served(run: Path, tmp_path: Path, serve) -> None:
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / "validation", elsewhere)
    (run / "validation").symlink_to(elsewhere, target_is_directory=True)
    served = serve(run)
    assert served.json("/api/run/0/validation") == {"steps": [], "floor": None}
    assert served.get("/run/0/validation/step-000004/pair-00-grid.png")[0] == 403


# --- the page in a real browser -------------------------------------------------------------


def _browser() -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.skip("no chromium: apt-get install chromium (or chromium-browser, google-chrome) for the "
                    "browser test of difftune watch")
    return found


def _rendered(browser: str, url: str, profile: Path, budget_ms: int) -> str:
    """The page's DOM after `budget_ms` of the page's own (virtual) time: its polls run."""
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and "<body" in done.stdout, done.stderr[-2000:]
    return html.unescape(done.stdout)


def test_the_page_draws_curves_and_the_newest_images_of_each_run(run: Path, tmp_path: Path, serve) -> None:
    browser = _browser()
    other = copy_run(run, tmp_path / "other")
    served = serve(run, other)
    dom = _rendered(browser, f"http://127.0.0.1:{served.port}/", tmp_path / "profile", 3000)
    assert dom.count('class="uplot') >= 4 and "<canvas" in dom  # loss, lr, throughput, metrics
    assert re.search(r'id="chart-loss" data-points="4" data-last-step="4"', dom)
    assert f"{run.parent.name}/run: loss, mean of 10" in dom and "other/run: learning rate" in dom
    assert re.search(r'<img src="/run/0/validation/step-000004/pair-00-grid\.png\?m=\d+"', dom)
    assert "red circle with blue background" in dom and '<option value="1">other/run</option>' in dom
    assert 'data-latest-step="4"' in dom and "finished: final/ written at step 4" in dom


def test_the_page_updates_in_place_while_the_run_goes_on(run: Path, tmp_path: Path, serve,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One page load: after its first poll the run writes steps 5 and 6 and a validation at
    6; the next polls must show them without a reload."""
    browser = _browser()
    real = watch.events_since
    calls = {"n": 0}

    def run_goes_on(watched: Any, since: int) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 2:  # the page has loaded and polled once: the run moves on
            _append_steps(run, range(5, 7), validated=6)
        return real(watched, since)

    monkeypatch.setattr(watch, "events_since", run_goes_on)
    served = serve(run)
    dom = _rendered(browser, f"http://127.0.0.1:{served.port}/", tmp_path / "profile", 7000)
    polls = int(re.search(r'data-polls="(\d+)"', dom).group(1))
    assert polls >= 3 and calls["n"] >= 3, (polls, calls)
    assert 'data-latest-step="6"' in dom and "step 6 (3 of 3)" in dom
    assert re.search(r'id="chart-loss" data-points="6" data-last-step="6"', dom)  # the new points drawn
    assert re.search(r'id="chart-metrics" data-points="4" data-last-step="6"', dom)  # 0 (floor), 2, 4, 6
    assert re.search(r'<img src="/run/0/validation/step-000006/pair-00-grid\.png\?m=\d+"', dom)
    assert "step-000004/pair-00-grid" not in dom  # the slider followed the newest
