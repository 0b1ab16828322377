"""The run directory's one owner (difftune/rundir.py): which folders are runs, what a run
stands for as a model, and its readers, shared by training, generate, export and report."""

from __future__ import annotations

import json
from pathlib import Path

from difftune.rundir import RunDir, model_source, read_events, run_config, run_of


def make_run(folder: Path, finished: bool = True) -> RunDir:
    run = RunDir(folder)
    folder.mkdir(parents=True)
    run.events.write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    run.config_file.write_text('[model]\nfamily = "sd"\n')
    if finished:
        run.final.mkdir()
    return run


def test_a_run_is_known_by_its_log_or_its_own_lock_never_by_another_tools_files(tmp_path: Path) -> None:
    assert make_run(tmp_path / "run").is_run()
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / ".lock").write_text("pid 12 on host")
    assert RunDir(stopped).is_run()
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.toml").write_text("x = 1")
    (other / ".lock").write_text("locked by another tool")
    assert not RunDir(other).is_run()


def test_a_finished_run_stands_for_its_final_folder_and_anything_else_for_itself(tmp_path: Path) -> None:
    finished = make_run(tmp_path / "done")
    unfinished = make_run(tmp_path / "going", finished=False)
    assert model_source(str(finished.path)) == str(finished.final)
    assert model_source(str(unfinished.path)) == str(unfinished.path)
    assert unfinished.unfinished() and not finished.unfinished()
    assert model_source("org/model-on-the-hub") == "org/model-on-the-hub"
    plain = tmp_path / "plain"
    (plain / "final").mkdir(parents=True)  # a final/ folder alone does not make a run
    assert model_source(str(plain)) == str(plain)


def test_the_run_of_a_path_is_found_from_the_run_or_a_folder_in_it(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    assert run_of(run.path) == run
    assert run_of(run.final) == run
    assert run_of(tmp_path) is None
    assert run_config(run.final) == {"model": {"family": "sd"}}
    run.config_file.write_text("not = [toml")
    assert run_config(run.path) is None


def test_the_log_is_read_past_lines_cut_short_or_edited(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    with run.events.open("a") as log:
        log.write('{"event": "step", "step": 1}\n{"event": "step", "st\n[1, 2]\n{"no_event": 1}\n')
    assert [e["event"] for e in read_events(run.path)] == ["start", "step"]
    assert RunDir(tmp_path / "missing").read_events() == []
