"""Streaming failures keep work and name the shard: a truncated or junk .tar and a sample
missing a member stop naming the shard and the member, or with data.on_bad = "skip" are
passed over with a logged line naming them. A run stopped by a bad row (streamed or
local) saves a checkpoint of its last finished step first, as SIGTERM does, so the same
command resumes from it."""

import io
import logging
import random
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import run_config
from safetensors.torch import load_file

from difftune.config import build_config
from difftune.data.sources import Columns, DataError
from difftune.data.stream_checks import check_stream
from difftune.data.streaming import StreamingSamples
from difftune.data.synthetic import write_fill_circles_webdataset
from difftune.training.checkpoint import complete_checkpoints
from difftune.training.events import read_events
from difftune.training.loop import Run, train

WEBDATASET_COLUMNS = {"image_column": "png", "conditioning_image_column": "conditioning.png", "caption_column": "txt"}
COLUMNS = Columns(image="png", caption="txt", conditioning="conditioning.png")


def _members(shard: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(shard) as archive:
        return [(m, archive.extractfile(m).read()) for m in archive.getmembers()]


def _rewrite(shard: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(shard, "w") as archive:
        for member, payload in members:
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))


def _cut_after_sample(shard: Path, key: str) -> None:
    """The shard cut right after sample `key`'s last member: every header before the cut
    is whole, so tarfile ends there without a word (no end-of-archive block)."""
    offset = 0
    with tarfile.open(shard) as archive:
        for member in archive.getmembers():
            if member.name.startswith(f"{key}."):
                offset = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    shard.write_bytes(shard.read_bytes()[:offset])


def damage(shard: Path, how: str) -> None:
    """Damage one shard of fill-circles: cut in half, cut at a sample boundary, replaced by
    junk, or its second sample's conditioning image left out."""
    if how == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif how == "cut between samples":
        _cut_after_sample(shard, _members(shard)[3][0].name.split(".")[0])
    elif how == "junk":
        shard.write_bytes(random.Random(0).randbytes(6000))
    elif how == "missing member":
        second = _members(shard)[3][0].name.split(".")[0]
        _rewrite(shard, [(m, p) for m, p in _members(shard) if m.name != f"{second}.conditioning.png"])
    elif how == "caption not text":
        second = _members(shard)[3][0].name.split(".")[0]
        _rewrite(shard, [(m, b"\xff\xfe not UTF-8" if m.name == f"{second}.txt" else p) for m, p in _members(shard)])


def _stream(tmp_path: Path, how: str, on_bad: str, bad_shard: int = 1) -> tuple[Path, object]:
    """8 samples in two shards (one damaged) and the data config that streams them."""
    data = write_fill_circles_webdataset(tmp_path / "shards", 8, 32, seed=0, shards=2)
    damage(data / f"shard-{bad_shard:05d}.tar", how)
    raw = {"path": str(data), "streaming": True, "max_samples": 8, "shuffle_buffer": 1, "resolution": 32,
           "on_bad": on_bad, **WEBDATASET_COLUMNS}
    return data, build_config({"model": {"pretrained": "unused"}, "data": raw,
                               "train": {"output_dir": str(tmp_path / "unused")}}).data


def _epoch(config: object) -> list[dict]:
    samples = StreamingSamples(config, seed=0, columns=COLUMNS)
    samples.bind(0, 1, global_batch=2)
    samples.start_epoch(0)
    return list(samples)


EXPECTED = {
    "truncated": r"shard-00001\.tar: .*truncated.* member 0000\d\d\.",
    "cut between samples": r"shard-00001\.tar: .*truncated.* member 000003\.txt",
    "junk": r"shard-00001\.tar: not a tar archive",
    "missing member": r"shard-00001\.tar, sample 000003 .*no member 000003\.conditioning\.png",
    "caption not text": r"shard-00001\.tar, member 000003\.txt .*not UTF-8 text",
}


@pytest.mark.parametrize("how", list(EXPECTED))
def test_a_damaged_shard_stops_naming_the_shard_and_member(how: str, tmp_path: Path) -> None:
    _, config = _stream(tmp_path, how, "error")
    with pytest.raises(DataError, match=EXPECTED[how]):
        _epoch(config)


@pytest.mark.parametrize("how", list(EXPECTED))
def test_a_damaged_shard_is_passed_over_with_skip_and_logged(how: str, tmp_path: Path, caplog) -> None:
    _, config = _stream(tmp_path, how, "skip")
    with caplog.at_level(logging.WARNING, logger="difftune.data.streaming"):
        samples = _epoch(config)
    assert len(samples) == 8  # the next rows took the bad ones' places
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "data.on_bad = \"skip\"" in logged and re.search(EXPECTED[how], logged), logged


def test_a_damaged_first_shard_is_named_before_models_load_or_skipped(tmp_path: Path, caplog) -> None:
    _, config = _stream(tmp_path / "error", "junk", "error", bad_shard=0)
    with pytest.raises(DataError, match=r"shard-00000\.tar: not a tar archive"):
        check_stream(config, needs_conditioning=True, fixed_caption=None)
    _, config = _stream(tmp_path / "skip", "junk", "skip", bad_shard=0)
    with caplog.at_level(logging.WARNING, logger="difftune.data.streaming"):
        assert check_stream(config, needs_conditioning=True, fixed_caption=None) == COLUMNS
    assert "shard-00000.tar: not a tar archive" in caplog.text


def test_a_stream_with_no_good_row_stops_instead_of_reading_forever(tmp_path: Path) -> None:
    _, config = _stream(tmp_path, "junk", "skip")
    damage(Path(config.path) / "shard-00000.tar", "junk")
    with pytest.raises(DataError, match=r"no row .* can be trained on"):
        check_stream(config, needs_conditioning=True, fixed_caption=None)


def test_a_share_with_no_good_row_stops_instead_of_reading_it_again_and_again(tmp_path: Path) -> None:
    data, config = _stream(tmp_path, "none", "skip")
    for shard in data.glob("*.tar"):  # every image junk
        _rewrite(shard, [(m, b"junk" if m.name.endswith(".png") else p) for m, p in _members(shard)])
    samples = StreamingSamples(config, seed=0, columns=COLUMNS)
    samples.bind(0, 1, global_batch=2)
    rows = samples._rows

    def counted():
        for n, row in enumerate(rows()):
            assert n < 100, "the stream is read again and again for a row that can be trained on"
            yield row

    samples._rows = counted
    with pytest.raises(DataError, match=r"no row of process 0's share of the stream can be trained on"):
        next(iter(samples))


def test_a_stream_datasets_cannot_read_on_is_named(tmp_path: Path) -> None:
    """A parquet stream whose second file is junk: a sentence naming the stream and where
    it broke (a DataError, which the loop checkpoints before), not pyarrow's traceback."""
    import datasets
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(png, format="PNG")
    image = {"bytes": png.getvalue(), "path": "red.png"}
    rows = datasets.Dataset.from_dict({"image": [image] * 4, "conditioning_image": [image] * 4, "text": ["red"] * 4},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "conditioning_image": datasets.Image(),
                                                                  "text": datasets.Value("string")}))
    data = tmp_path / "parquet"
    data.mkdir()
    rows.to_parquet(str(data / "train-00000-of-00002.parquet"))
    (data / "train-00001-of-00002.parquet").write_bytes(random.Random(0).randbytes(3000))
    raw = {"path": str(data), "streaming": True, "max_samples": 8, "shuffle_buffer": 1, "resolution": 32}
    config = build_config({"model": {"pretrained": "unused"}, "data": raw,
                           "train": {"output_dir": str(tmp_path / "unused")}}).data
    columns = check_stream(config, needs_conditioning=True, fixed_caption=None)
    samples = StreamingSamples(config, seed=0, columns=columns)
    samples.bind(0, 1, global_batch=2)
    broken = r"parquet'.*cannot be read on after \d row\(s\) of process 0's share.*ArrowInvalid"
    with pytest.raises(DataError, match=broken):
        list(samples)


def _streaming_run(base: Path, data: Path, out: Path, **train_settings: object) -> dict:
    raw = run_config(base, data, out, train={"checkpoint_every": 100, **train_settings})
    raw["data"].update({"streaming": True, "max_samples": 10, "shuffle_buffer": 1, **WEBDATASET_COLUMNS})
    raw["validation"] = {"every": 100}
    return raw


def _weights(run: Path) -> dict:
    return load_file(run / "final" / "diffusion_pytorch_model.safetensors")


def test_a_bad_row_mid_run_stops_after_a_checkpoint_of_the_last_finished_step(tiny_base: Path, tmp_path: Path) -> None:
    """Row 6 is the second micro-batch of step 2's accumulation window: the run stops
    with a checkpoint of step 1 (not of half of step 2) and, the row put right, the same
    config resumes from it to the weights of a run that never stopped."""
    good = write_fill_circles_webdataset(tmp_path / "good", 10, 64, seed=0, shards=1)
    data = tmp_path / "data"
    shutil.copytree(good, data)
    shard = data / "shard-00000.tar"
    _rewrite(shard, [(m, b"not a png" if m.name == "000006.png" else p) for m, p in _members(shard)])
    run = tmp_path / "run"
    raw = _streaming_run(tiny_base, data, run, max_steps=2, gradient_accumulation_steps=2)
    with pytest.raises(DataError, match=r"shard-00000\.tar, member 000006\.png .*unreadable image.*step 1"):
        train(build_config(raw))
    assert [c.name for c in complete_checkpoints(run)] == ["step-000001"]
    assert not (run / "final").exists()
    stopped = [e for e in read_events(run) if e["event"] == "stopped"]
    assert [(e["step"], e["reason"]) for e in stopped] == [(1, "bad data")] and "000006.png" in stopped[0]["problem"]
    shutil.copy(good / "shard-00000.tar", shard)
    assert train(build_config(raw)) == run / "final"
    assert [e["step"] for e in read_events(run) if e["event"] == "start"] == [0, 1]
    train(build_config(_streaming_run(tiny_base, good, tmp_path / "straight", max_steps=2,
                                      gradient_accumulation_steps=2)))
    straight, resumed = _weights(tmp_path / "straight"), _weights(run)
    assert all((straight[k] == resumed[k]).all() for k in straight)


def test_a_local_image_gone_bad_while_training_stops_after_a_checkpoint(tiny_base: Path, circles: Path,
                                                                      tmp_path: Path) -> None:
    data = tmp_path / "circles"
    shutil.copytree(circles, data)
    out = tmp_path / "run"
    raw = run_config(tiny_base, data, out, train={"max_steps": 6, "checkpoint_every": 100})
    raw["data"].update(cache_latents=False, cache_text=False)
    raw["validation"] = {"every": 100}
    run = Run(build_config(raw))  # the data is checked here; the files go bad after step 2
    after_step = run._after_step

    def spoil_images_after_step_2(state, *args, **kwargs):
        after_step(state, *args, **kwargs)
        if state.step == 2:
            for image in (data / "images").iterdir():
                image.write_bytes(b"not a png any more")

    run._after_step = spoil_images_after_step_2
    with pytest.raises(DataError, match=r"row \d+, column 'image'.*unreadable image.*step 2"):
        run.fit()
    assert [c.name for c in complete_checkpoints(out)] == ["step-000002"]
    assert not (out / "final").exists()
    assert [e["step"] for e in read_events(out) if e["event"] == "stopped"] == [2]


def test_a_bad_row_met_in_a_loader_worker_keeps_its_own_sentence() -> None:
    """With loader workers (the default on a GPU) a row's DataError reaches the loop
    wrapped in torch's traceback text; the run ends with the row's sentence alone."""
    from torch.utils.data import DataLoader, Dataset

    from difftune.training.guards import own_sentence

    class Unreadable(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> None:
            raise DataError(f"data, row {index}, column 'image': unreadable image")

    with pytest.raises(DataError) as caught:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert "Traceback" in str(caught.value)  # what torch hands on
    assert own_sentence(caught.value) == "data, row 0, column 'image': unreadable image"


def test_a_bad_row_in_one_process_stops_both_after_one_checkpoint(tiny_base: Path, tmp_path: Path) -> None:
    """Two processes, a shard each: the bad row is in process 0's second batch. Both stop
    at the same batch, save step 1 together and exit with a message (none waits forever
    in a collective for the other)."""
    import subprocess
    import sys

    from difftune.config import to_toml

    data = write_fill_circles_webdataset(tmp_path / "shards", 10, 64, seed=0, shards=2)
    shard = data / "shard-00000.tar"  # 000000, 000002, ... 000008
    _rewrite(shard, [(m, b"not a png" if m.name == "000006.png" else p) for m, p in _members(shard)])
    run = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(to_toml(build_config(_streaming_run(tiny_base, data, run, max_steps=3))))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "difftune",
                           "train", str(config)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "shard-00000.tar, member 000006.png" in " ".join(done.stderr.split()), done.stderr[-3000:]
    assert [c.name for c in complete_checkpoints(run)] == ["step-000001"]
    assert [e["step"] for e in read_events(run) if e["event"] == "stopped"] == [1]
