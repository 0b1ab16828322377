"""Issue 24, the encoded cache: trust nothing read back from it. A shard whose bytes
changed, a shard or index that is a link, an index naming a path outside its folder or
lacking checksums: each is said in one line and encoded again, to the same values.
`difftune cache clear` removes only difftune's own contexts, never one a run holds, and
refuses an --older-than that is not a number of days."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_config

from difftune.cli import main
from difftune.config import build_config
from difftune.data.cache import Processes, build_cache
from difftune.families import get_family


def _build(encoder: dict[str, Any], folder: Path) -> tuple[Any, dict[str, int]]:
    return build_cache(encoder["samples"], encoder["family"], encoder["parts"], True, True, folder, 4, Processes())


def _first_latent(dataset: Any) -> torch.Tensor:
    return dataset[(0, 0)]["latent_mean"]


def _latent_context(folder: Path) -> Path:
    (context,) = [p for p in (folder / "latents").iterdir() if not p.name.startswith(".")]
    return context


def _entries(index: dict) -> dict:
    """The {key: shard} part of an index, in the format before checksums or after."""
    return index["entries"] if "entries" in index else index


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _flip_a_data_byte(context: Path, _: Path) -> None:
    shard = next(context.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40  # in the last tensor's bytes: the header still reads
    shard.write_bytes(bytes(data))


def _grow_a_shard(context: Path, _: Path) -> None:
    with next(context.glob("shard-*.safetensors")).open("ab") as shard:
        shard.write(b"\0" * 7)  # safetensors still reads it: only the recorded size tells


def _cut_a_shard(context: Path, _: Path) -> None:
    shard = next(context.glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-5])


def _unreadable_index(context: Path, _: Path) -> None:
    (context / "index.json").write_text('{"half an ind')


def _index_naming_a_path_outside(context: Path, outside: Path) -> None:
    shard = next(context.glob("shard-*.safetensors"))
    shutil.copy(shard, outside / "elsewhere.safetensors")
    index = json.loads((context / "index.json").read_text())
    entries = _entries(index)
    for key in entries:
        entries[key] = os.path.relpath(outside / "elsewhere.safetensors", context)
    (context / "index.json").write_text(json.dumps(index))


def _shard_linked_to_a_copy(context: Path, outside: Path) -> None:
    shard = next(context.glob("shard-*.safetensors"))
    shutil.move(shard, outside / shard.name)  # the same bytes: only the link is wrong
    shard.symlink_to(outside / shard.name)


def _index_linked_to_a_copy(context: Path, outside: Path) -> None:
    shutil.move(context / "index.json", outside / "index.json")
    (context / "index.json").symlink_to(outside / "index.json")


def _index_without_checksums(context: Path, _: Path) -> None:
    """As version 2 wrote it: {key: shard}, nothing to check a shard against."""
    index = json.loads((context / "index.json").read_text())
    (context / "index.json").write_text(json.dumps(_entries(index)))


DAMAGES = {
    "a flipped byte in a shard": (_flip_a_data_byte,
                                  r"shard-\w+\.safetensors has the size index\.json records, but its checksum differs"),
    "a shard that grew": (_grow_a_shard, r"shard-\w+\.safetensors is 7 bytes longer than index\.json records"),
    "a shard cut short": (_cut_a_shard, r"shard-\w+\.safetensors is 5 bytes shorter than index\.json records"),
    "an unreadable index": (_unreadable_index, r"index\.json is unreadable"),
    "an index naming a path outside": (_index_naming_a_path_outside, r"name no shard of this folder"),
    "a shard that is a link": (_shard_linked_to_a_copy, r"shard-\w+\.safetensors is not a plain file"),
    "an index that is a link": (_index_linked_to_a_copy, r"index\.json cannot be read \(a symbolic link"),
    "an index without checksums": (_index_without_checksums, r"shard-\w+\.safetensors has no checksum"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_cache_that_fails_its_check_is_said_and_encoded_again(damage: str, encoder: dict[str, Any],
                                                                tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    first, stats = _build(encoder, tmp_path / "cache")
    assert stats["latents_encoded"] == 12
    expected = _first_latent(first).clone()
    del first
    outside = tmp_path / "outside"
    outside.mkdir()
    change, said = DAMAGES[damage]
    change(_latent_context(tmp_path / "cache"), outside)
    before = _listing(outside)
    with caplog.at_level(logging.WARNING, logger="difftune.data.cache"):
        second, stats = _build(encoder, tmp_path / "cache")
    assert stats["latents_encoded"] == 12 and stats["texts_encoded"] == 0  # the text cache was not touched
    lines = [r.getMessage() for r in caplog.records if "encoded again" in r.getMessage()]
    assert len(lines) == 1 and re.search(said, lines[0]), lines
    assert torch.equal(_first_latent(second), expected)
    assert _listing(outside) == before  # nothing outside the cache folder was written or removed
    # the damaged shard is gone from the folder and the index; a third build reuses all
    context = _latent_context(tmp_path / "cache")
    shards = {p.name for p in context.glob("shard-*.safetensors") if not p.is_symlink()}
    assert set(_entries(json.loads((context / "index.json").read_text())).values()) <= shards
    assert _build(encoder, tmp_path / "cache")[1]["latents_encoded"] == 0


def _clear(folder: Path, capsys: pytest.CaptureFixture, *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["cache", "clear", "--dir", str(folder), *flags])
    return code, capsys.readouterr().err


def test_clear_removes_only_difftunes_contexts_and_follows_no_link(encoder: dict[str, Any], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    dataset, _ = _build(encoder, cache)
    dataset.close()
    ours = _latent_context(cache)
    outside = tmp_path / "outside"
    shutil.copytree(ours, outside / ("a" * 32))  # a context, but outside the cache folder
    foreign = {
        "notes.txt": lambda p: p.write_text("mine"),  # a user's file beside the kinds
        "latents/other-tool": lambda p: (p.mkdir(), (p / "index.json").write_text("{}")),
        f"latents/{'b' * 32}": lambda p: (shutil.copytree(ours, p), (p / "thesis.txt").write_text("mine")),
        f"latents/{'c' * 32}": lambda p: p.symlink_to(outside / ("a" * 32)),
    }
    for name, make in foreign.items():
        make(cache / name)
    (cache / "text").rename(tmp_path / "text-elsewhere")
    (cache / "text").symlink_to(tmp_path / "text-elsewhere")  # a kind folder that is a link
    code, said = _clear(cache, capsys)
    assert code == 0 and "removed 1 context(s)" in said and not ours.exists()
    for name in [*foreign, "text"]:
        assert (cache / name).exists() or (cache / name).is_symlink(), name
        assert name in said, name  # each thing left alone is said
    assert (outside / ("a" * 32) / "index.json").is_file() and (cache / f"latents/{'b' * 32}/thesis.txt").is_file()
    assert any((tmp_path / "text-elsewhere").iterdir())


_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from difftune.data.cache import CacheStore

    store = CacheStore(Path(sys.argv[1]))  # what a run's dataset holds while it trains
    print("holding", flush=True)
    sys.stdin.read()  # until the test closes our stdin
""")


def test_clear_skips_a_context_a_live_run_holds(encoder: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    dataset, _ = _build(encoder, cache)
    # the run's own dataset holds its contexts (another open file description, this process)
    code, said = _clear(cache, capsys)
    assert code == 0 and "removed 0 context(s)" in said and said.count("a running training holds it") == 2
    capsys.readouterr()
    assert main(["cache", "list", "--dir", str(cache)]) == 0 and "(in use by a run)" in capsys.readouterr().err
    dataset.close()
    # another process holds the latent context
    context = _latent_context(cache)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(context)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        code, said = _clear(cache, capsys)
        assert "removed 1 context(s)" in said and f"kept latents/{context.name}: a running training holds it" in said
        assert (context / "index.json").is_file()
    finally:
        holder.stdin.close()
        holder.wait()
    code, said = _clear(cache, capsys)
    assert "removed 1 context(s)" in said and not context.exists()


@pytest.mark.parametrize("days", ["nan", "inf", "-1", "-inf", "1e400"])
def test_older_than_that_is_not_a_number_of_days_is_refused(days: str, encoder: dict[str, Any], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "cache"
    _build(encoder, cache)[0].close()
    code, said = _clear(cache, capsys, f"--older-than={days}")  # "=": argparse reads "-inf" alone as a flag
    assert code == 2 and "--older-than" in said and "removed" not in said
    assert len(list((cache / "latents").iterdir())) == 1 and len(list((cache / "text").iterdir())) == 1


def test_an_unset_cache_is_not_chosen_where_its_folder_cannot_hold_it(tiny_base: Path, circles: Path,
                                                                       tmp_path: Path) -> None:
    """A cache folder that is a file, under a file, or inside the training data: set to
    true it is a config error before any model loads (training.plan); left unset, the
    cache must not be chosen there (it failed after the models loaded, or read its shards
    as training data)."""
    from difftune.training.cache_choice import choose_caches

    data = shutil.copytree(circles, tmp_path / "data")
    (tmp_path / "a-file").write_text("mine")
    for folder, reason in ((tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "sub", "is a file"),
                           (data / "cache", "inside data.path")):
        raw = run_config(tiny_base, data, tmp_path / "run", data={"encoded_cache_dir": str(folder)},
                         train={"max_steps": 12})  # each sample twice: the caches would pay
        raw["validation"] = {"every": 1000}
        chosen = choose_caches(build_config(raw), 12, get_family("sd"))
        assert (chosen.latents, chosen.text) == (False, False), folder
        assert all(reason in note and "data.encoded_cache_dir" in note for note in chosen.notes), chosen.notes
    assert (tmp_path / "a-file").read_text() == "mine" and not (data / "cache").exists()


def test_each_shard_is_checked_once_per_process_never_per_row(encoder: dict[str, Any], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from difftune.data import cache_manifest

    _build(encoder, tmp_path / "cache")[0].close()
    checked: list[str] = []
    checksum = cache_manifest.crc32  # the real one, counted
    monkeypatch.setattr(cache_manifest, "crc32", lambda path: checked.append(Path(path).name) or checksum(path))
    dataset, stats = _build(encoder, tmp_path / "cache")  # a new run: every shard it reads is checked
    assert stats["latents_encoded"] == stats["texts_encoded"] == 0
    shards = {p.name for p in (tmp_path / "cache").glob("*/*/shard-*.safetensors")}
    assert sorted(checked) == sorted(shards) and len(shards) == 2
    checked.clear()
    for epoch in range(2):
        for index in range(len(dataset)):
            dataset[(epoch, index)]
    worker = pickle.loads(pickle.dumps(dataset))  # what a DataLoader worker started by spawn gets
    for index in range(len(worker)):
        worker[(0, index)]
    assert checked == []


def test_a_finished_run_lets_go_while_its_loader_workers_live(encoder: dict[str, Any], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """Forked DataLoader workers (persistent: alive until the loader goes) inherit the
    lock's descriptor; the lock must still end when the run closes its dataset."""
    from torch.utils.data import DataLoader

    cache = tmp_path / "cache"
    dataset, _ = _build(encoder, cache)
    loader = DataLoader(dataset, batch_size=2, sampler=[(0, 0), (0, 1)], collate_fn=dataset.collate, num_workers=1,
                        multiprocessing_context="fork", persistent_workers=True)
    batches = iter(loader)
    assert next(batches)["latent_mean"].shape[0] == 2  # the worker is alive, and stays so
    dataset.close()
    code, said = _clear(cache, capsys)
    del batches, loader
    assert "removed 2 context(s)" in said, said


def test_a_link_among_a_contexts_own_files_is_never_written_through(encoder: dict[str, Any], tmp_path: Path) -> None:
    cache, precious = tmp_path / "cache", tmp_path / "precious.txt"
    _build(encoder, cache)[0].close()
    context = _latent_context(cache)
    precious.write_text("mine")
    for name in (".lock", ".in-use"):
        (context / name).unlink(missing_ok=True)
        (context / name).symlink_to(precious)
    next(context.glob("shard-*.safetensors")).unlink()  # the next build writes a shard and the index
    dataset, stats = _build(encoder, cache)
    assert stats["latents_encoded"] == 12 and precious.read_text() == "mine"
    assert not (context / ".lock").is_symlink() and not (context / ".in-use").is_symlink()


def test_a_context_that_is_a_link_is_refused_naming_it(encoder: dict[str, Any], tmp_path: Path) -> None:
    from difftune.errors import UserError

    cache = tmp_path / "cache"
    _build(encoder, cache)[0].close()
    context = _latent_context(cache)
    elsewhere = shutil.move(context, tmp_path / "elsewhere")
    context.symlink_to(elsewhere)
    before = _listing(Path(elsewhere))
    with pytest.raises(UserError, match=re.escape(str(context)) + ".* symbolic link"):
        _build(encoder, cache)
    assert _listing(Path(elsewhere)) == before


def test_a_run_that_starts_while_clear_removes_its_context_makes_it_anew(tmp_path: Path) -> None:
    """The run waits for clear's lock, then must not use the removed folder's lock file
    (or write into a folder that is gone): it makes the context again."""
    import threading
    import time

    from difftune.data.cache import CacheStore
    from difftune.data.cache_folder import remove_locked
    from difftune.data.cache_manifest import IN_USE, lock_alone

    context = tmp_path / "latents" / ("a" * 32)
    first = CacheStore(context)
    first.put("b" * 32, {"x": torch.ones(3)})
    first.flush()
    first.close()
    lock = lock_alone(context)  # what clear holds while it removes the context
    started: list[CacheStore] = []
    run = threading.Thread(target=lambda: started.append(CacheStore(context)))
    run.start()
    waiter = f":{os.stat(context / IN_USE).st_ino} "
    deadline = time.monotonic() + 60  # a condition, not a delay: the run is queued on the lock
    while not any("->" in line and waiter in line for line in Path("/proc/locks").read_text().splitlines()):
        assert time.monotonic() < deadline, "the run never waited for the lock"
        time.sleep(0.01)
    assert remove_locked(context) is None
    os.close(lock)
    run.join()
    (store,) = started
    assert store.index == {} and (context / IN_USE).is_file()
    store.put("c" * 32, {"x": torch.zeros(3)})
    store.flush()
    assert torch.equal(CacheStore(context).get("c" * 32)["x"], torch.zeros(3))
    assert not [p for p in context.parent.iterdir() if p.name.startswith(".removing")]
