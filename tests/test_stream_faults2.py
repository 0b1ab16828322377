"""More streaming faults, each named by its shard and sample: a first sample missing a
member is that sample's problem (not a missing column), a shard whose samples' members
are not consecutive is refused, compressed shards are read (and their damage named) as
.tar ones are, shard paths that are links out of the folder or not files are refused
before any model loads, and an empty or non-image member says so."""

import gzip
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
from test_stream_faults import COLUMNS, _epoch, _members, _rewrite, _stream

from difftune.data.sources import DataError
from difftune.data.stream_checks import check_stream


def _without(shard: Path, name: str) -> None:
    _rewrite(shard, [(m, p) for m, p in _members(shard) if m.name != name])


def _check(config: object) -> object:
    return check_stream(config, needs_conditioning=True, fixed_caption=None)


def test_a_first_sample_missing_a_member_is_named_by_shard_and_key_not_as_a_missing_column(tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "none", "error")
    _without(data / "shard-00000.tar", "000000.txt")
    with pytest.raises(DataError, match=r"shard-00000\.tar, sample 000000\b.*no member 000000\.txt") as caught:
        _check(config)
    assert "is not a column" not in str(caught.value)


def test_a_first_sample_missing_a_member_is_skipped_with_a_line(tmp_path: Path, caplog) -> None:
    data, config = _stream(tmp_path, "none", "skip")
    _without(data / "shard-00000.tar", "000000.txt")
    with caplog.at_level(logging.WARNING, logger="difftune.data.streaming"):
        assert _check(config) == COLUMNS
        assert len(_epoch(config)) == 8
    assert 'data.on_bad = "skip"' in caplog.text
    assert "shard-00000.tar, sample 000000" in caplog.text and "no member 000000.txt" in caplog.text


@pytest.mark.parametrize("on_bad", ["error", "skip"])
def test_a_column_no_sample_has_is_still_a_missing_column(on_bad: str, tmp_path: Path, caplog) -> None:
    data, config = _stream(tmp_path, "none", on_bad)
    config = config.model_copy(update={"caption_column": "text"})
    with caplog.at_level(logging.WARNING, logger="difftune.data.streaming"):
        with pytest.raises(DataError, match=r"data.caption_column = 'text' is not a column"):
            _check(config)
    assert "skipping" not in caplog.text  # not a line for every sample read before saying so


def _interleave(shard: Path) -> None:
    """Members in the order a.png, b.png, a.conditioning.png, ...: not grouped by key."""
    members = _members(shard)
    _rewrite(shard, sorted(members, key=lambda m: (m[0].name.split(".", 1)[1], m[0].name)))


def test_members_not_grouped_by_key_stop_naming_the_shard_and_key(tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "none", "error")
    _interleave(data / "shard-00001.tar")
    with pytest.raises(DataError, match=r"shard-00001\.tar: the members of sample 000001 are not consecutive") as caught:
        _epoch(config)
    assert "no member" not in str(caught.value)  # a.txt is there, later: never said to be missing


def test_members_not_grouped_by_key_in_the_first_shard_are_named_before_models_load_or_skipped(
        tmp_path: Path, caplog) -> None:
    data, config = _stream(tmp_path / "error", "none", "error")
    _interleave(data / "shard-00000.tar")
    with pytest.raises(DataError, match=r"shard-00000\.tar: the members of sample 000000 are not consecutive"):
        _check(config)
    data, config = _stream(tmp_path / "skip", "none", "skip")
    _interleave(data / "shard-00000.tar")
    with caplog.at_level(logging.WARNING, logger="difftune.data.streaming"):
        assert _check(config) == COLUMNS
        samples = _epoch(config)
    assert len(samples) == 8
    assert "shard-00000.tar: the members of sample 000000 are not consecutive" in caplog.text
    assert "no member" not in caplog.text


def _compress(shard: Path, suffix: str) -> Path:
    packed = shard.with_name(shard.name.removesuffix(".tar") + suffix)
    packed.write_bytes(gzip.compress(shard.read_bytes()))
    shard.unlink()
    return packed


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_gzipped_shards_are_read_as_tar_ones_are(suffix: str, tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "none", "error")
    for shard in sorted(data.glob("*.tar")):
        _compress(shard, suffix)
    assert _check(config) == COLUMNS
    samples = _epoch(config)
    assert len(samples) == 8 and len({s["caption"] for s in samples}) == 8  # every sample of both shards


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_a_damaged_gzipped_shard_is_named(suffix: str, tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "truncated", "error")  # shard-00001.tar cut in half
    for shard in sorted(data.glob("*.tar")):
        _compress(shard, suffix)
    with pytest.raises(DataError, match=rf"shard-00001{suffix.replace('.', '[.]')}: .*truncated"):
        _epoch(config)
    (data / f"shard-00001{suffix}").write_bytes(gzip.compress(b"junk")[:20])  # a gzip stream cut short
    with pytest.raises(DataError, match=rf"shard-00001{suffix.replace('.', '[.]')}: "):
        _epoch(config)


def test_a_shard_linked_from_outside_the_folder_is_refused_naming_the_link(tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "none", "skip")
    outside = tmp_path / "elsewhere.tar"
    shutil.move(data / "shard-00001.tar", outside)
    (data / "shard-00001.tar").symlink_to(outside)
    with pytest.raises(DataError, match=r"shard-00001\.tar: a link to .*elsewhere\.tar, outside data\.path"):
        _check(config)


def test_a_shard_linked_from_inside_the_folder_is_read(tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "none", "error")
    (data / "kept").mkdir()
    shutil.move(data / "shard-00001.tar", data / "kept" / "shard.tar")
    (data / "shard-00001.tar").symlink_to(Path("kept") / "shard.tar")
    assert _check(config) == COLUMNS
    assert len(_epoch(config)) == 8


@pytest.mark.parametrize("what", ["folder", "fifo"])
def test_a_shard_that_is_not_a_file_is_refused_before_models_load(what: str, tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "none", "skip")
    odd = data / "shard-00009.tar"  # after the good shards: the first row alone would not find it
    odd.mkdir() if what == "folder" else os.mkfifo(odd)
    kind = "a folder" if what == "folder" else "a FIFO"
    with pytest.raises(DataError, match=rf"shard-00009\.tar: not a regular file: it is {kind}"):
        _check(config)


@pytest.mark.parametrize(("payload", "said"), [(b"", r"is empty \(0 bytes\)"),
                                               (b"not a png", r"is not an image .*b'not a png'")])
def test_an_empty_or_non_image_member_says_so_without_a_bytesio_repr(payload: bytes, said: str,
                                                                       tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "none", "error")
    shard = data / "shard-00000.tar"
    _rewrite(shard, [(m, payload if m.name == "000002.png" else p) for m, p in _members(shard)])
    with pytest.raises(DataError, match=rf"shard-00000\.tar, member 000002\.png .*{said}") as caught:
        _epoch(config)
    assert "BytesIO" not in str(caught.value)


def test_an_empty_first_member_is_named_before_models_load(tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "none", "error")
    shard = data / "shard-00000.tar"
    _rewrite(shard, [(m, b"" if m.name == "000000.png" else p) for m, p in _members(shard)])
    with pytest.raises(DataError, match=r"shard-00000\.tar, member 000000\.png .*is empty \(0 bytes\)") as caught:
        _check(config)
    assert "BytesIO" not in str(caught.value)


@pytest.mark.parametrize("read", ["check", "epoch"])
def test_a_stream_stopped_by_a_bad_row_leaves_no_reader_thread_behind(read: str, tmp_path: Path) -> None:
    """datasets reads the shards in a thread pool that its iterator shuts down when it is
    closed. Left to the garbage collector (the error's traceback holds the iterator, and
    `caught` makes a cycle of it), the close came in a thread being started and
    deadlocked: a run of this file hung. A stream left part-read is closed where it is
    left."""
    data, config = _stream(tmp_path, "none", "error")
    _interleave(data / ("shard-00000.tar" if read == "check" else "shard-00001.tar"))
    before = threading.active_count()
    with pytest.raises(DataError, match="not consecutive") as caught:
        _check(config) if read == "check" else _epoch(config)
    assert threading.active_count() == before, [t.name for t in threading.enumerate()]
    assert caught.value  # still held: only the stream was let go
