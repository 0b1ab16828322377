"""The encoded cache read as hostile input, continued (test_cache_trust.py): a cache file
that is a named pipe never hangs a run, a context's index and shards copied into another
context are not read as its own, a store that failed to open closes quietly, and
`difftune cache` given a --dir that is no folder says so."""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import run_config

from difftune.cli import main
from difftune.config import build_config
from difftune.data.cache import Processes, build_cache
from difftune.data.training import open_training_data


def _build(encoder: dict[str, Any], folder: Path, samples: Any = None) -> tuple[Any, dict[str, int]]:
    return build_cache(samples or encoder["samples"], encoder["family"], encoder["parts"], True, True, folder, 4,
                       Processes())


def _contexts(folder: Path, kind: str = "latents") -> list[Path]:
    return [p for p in (folder / kind).iterdir() if not p.name.startswith(".")]


def _release(fifo: Path) -> None:
    """Open the other end of a pipe a stuck reader (or writer) waits on, so that it ends."""
    for flags in (os.O_WRONLY, os.O_RDONLY):
        try:
            os.close(os.open(fifo, flags | os.O_NONBLOCK))
        except OSError as error:
            if error.errno != errno.ENXIO:  # no reader: the stuck one is a writer
                raise


def _without_hanging(call: Callable[[], Any], fifo: Path, seconds: float = 60) -> Any:
    """call(), failing the test (instead of hanging it) if it waits on the pipe."""
    done: dict[str, Any] = {}

    def run() -> None:
        try:
            done["value"] = call()
        except BaseException as error:  # noqa: BLE001 (handed to the test's thread)
            done["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        _release(fifo)
        thread.join(seconds)
        pytest.fail(f"reading the cache waited on the named pipe {fifo.name}")
    if "error" in done:
        raise done["error"]
    return done["value"]


@pytest.mark.parametrize("name", ["index.json", ".lock", ".in-use"])
def test_a_cache_file_that_is_a_named_pipe_is_said_and_replaced(name: str, encoder: dict[str, Any], tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    _build(encoder, cache)[0].close()
    (context,) = _contexts(cache)
    next(context.glob("shard-*.safetensors")).unlink()  # so that the build writes (and takes .lock)
    (context / name).unlink(missing_ok=True)
    os.mkfifo(context / name)
    with caplog.at_level(logging.WARNING, logger="difftune.data.cache"):
        dataset, stats = _without_hanging(lambda: _build(encoder, cache), context / name)
    assert stats["latents_encoded"] == 12 and stats["texts_encoded"] == 0
    if name == "index.json":
        lines = [r.getMessage() for r in caplog.records if "encoded again" in r.getMessage()]
        assert len(lines) == 1 and "index.json is not a plain file" in lines[0], lines
    assert (context / name).is_file()  # a plain file of difftune's in its place
    assert dataset[(0, 0)]["latent_mean"].ndim == 3
    dataset.close()


def test_a_store_that_failed_to_open_closes_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """__init__ failing after it took the lock (reading the index) leaves close and
    __del__ nothing to trip on, and lets the lock go."""
    from difftune.data import cache_store
    from difftune.data.cache_manifest import lock_alone

    def fail(folder: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cache_store, "read_manifest", fail)
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    context = tmp_path / "latents" / ("a" * 32)
    with pytest.raises(OSError, match="Input/output"):
        cache_store.CacheStore(context)
    gc.collect()
    assert unraisable == [], [str(u.exc_value) for u in unraisable]
    lock = lock_alone(context)
    assert lock is not None  # the failed store holds no lock
    os.close(lock)


def test_another_contexts_index_and_shards_are_not_read_as_this_ones(encoder: dict[str, Any], tiny_base: Path,
                                                                     circles: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The same images with random_flip make another context with the same entry keys:
    the copied entries (checksums valid, no flipped side) must be encoded again, not read."""
    cache = tmp_path / "cache"
    first = _build(encoder, cache)[0]
    shape = first[(0, 0)]["latent_mean"].shape
    first.close()
    (plain,) = _contexts(cache)
    raw = run_config(tiny_base, circles, tmp_path / "run", data={"random_flip": True})
    flipping = open_training_data(build_config(raw).data, 0, True)
    _build(encoder, cache, flipping)[0].close()
    (flipped,) = [p for p in _contexts(cache) if p != plain]
    for item in flipped.iterdir():
        if item.name == "index.json" or item.name.startswith("shard-"):
            item.unlink()
    for item in plain.iterdir():
        if item.name == "index.json" or item.name.startswith("shard-"):
            shutil.copy(item, flipped / item.name)
    with caplog.at_level(logging.WARNING, logger="difftune.data.cache"):
        dataset, stats = _build(encoder, cache, flipping)
    assert stats["latents_encoded"] == 12 and stats["texts_encoded"] == 0
    lines = [r.getMessage() for r in caplog.records if "encoded again" in r.getMessage()]
    assert len(lines) == 1 and re.search(r"index\.json was written for another context", lines[0]), lines
    for epoch in range(2):  # both sides read
        for index in range(len(dataset)):
            assert dataset[(epoch, index)]["latent_mean"].shape == shape
    dataset.close()
    index = json.loads((flipped / "index.json").read_text())
    assert index["context"] == flipped.name  # the copied shards are gone with the copied index
    assert {p.name for p in flipped.glob("shard-*")} == set(index["entries"].values())
    assert _build(encoder, cache, flipping)[1]["latents_encoded"] == 0  # the new index is this context's


def test_an_index_without_its_contexts_name_is_encoded_again(encoder: dict[str, Any], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """An index written before the context was stamped (or with the stamp edited out)."""
    cache = tmp_path / "cache"
    _build(encoder, cache)[0].close()
    (context,) = _contexts(cache)
    index = json.loads((context / "index.json").read_text())
    index.pop("context", None)
    (context / "index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="difftune.data.cache"):
        dataset, stats = _build(encoder, cache)
    dataset.close()
    assert stats["latents_encoded"] == 12
    lines = [r.getMessage() for r in caplog.records if "encoded again" in r.getMessage()]
    assert len(lines) == 1 and "index.json does not name its context" in lines[0], lines


def test_cache_verbs_given_a_dir_that_is_no_folder_say_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    for verb in ("clear", "list"):
        for folder, said in ((a_file, "is a file, not a folder"), (tmp_path / "missing", "does not exist"),
                             (a_file / "under", "is a file, not a folder")):
            capsys.readouterr()
            code = main(["cache", verb, "--dir", str(folder)])
            err = capsys.readouterr().err
            assert code == 2 and err.startswith("error: ") and said in err and str(folder) in err, (verb, err)
            assert "Traceback" not in err and "removed" not in err
    assert a_file.read_text() == "mine"
