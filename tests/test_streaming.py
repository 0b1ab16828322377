"""data.streaming: a run reads its rows as a stream (webdataset shards, an imagefolder),
each process its own share, and resumes where it stopped."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import run_config
from safetensors.torch import load_file

from difftune.config import ConfigError, build_config, to_toml
from difftune.data.sources import DataError, Columns
from difftune.data.streaming import StreamingSamples
from difftune.data.synthetic import write_fill_circles_webdataset
from difftune.training.loop import train

WEBDATASET_COLUMNS = {"image_column": "png", "conditioning_image_column": "conditioning.png", "caption_column": "txt"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fill_circles_webdataset(tmp_path_factory.mktemp("shards") / "circles", 12, 64, seed=0, shards=2)


def _streaming(base: Path, data: Path, out: Path, **train_settings: object) -> dict:
    raw = run_config(base, data, out, train={"checkpoint_every": 2, **train_settings})
    raw["data"].update({"streaming": True, "max_samples": 8, "shuffle_buffer": 4})
    raw["validation"] = {"every": 100}
    return raw


def _weights(run: Path) -> dict:
    return load_file(run / "final" / "diffusion_pytorch_model.safetensors")


def test_a_stream_of_webdataset_shards_trains_and_resumes_exactly(tiny_base: Path, shards: Path,
                                                                  tmp_path: Path) -> None:
    def config(out: str, steps: int) -> dict:
        raw = _streaming(tiny_base, shards, tmp_path / out, max_steps=steps)
        raw["data"].update(WEBDATASET_COLUMNS)
        return raw

    train(build_config(config("straight", 6)))  # 8 samples an epoch at batch 2: into the second epoch
    train(build_config(config("cut", 2)))
    train(build_config({**config("cut", 6)}))  # the same run, continued from its step-2 checkpoint
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert all((straight[k] == resumed[k]).all() for k in straight)
    events = [json.loads(line) for line in (tmp_path / "straight" / "events.jsonl").read_text().splitlines()]
    assert max(e["epoch"] for e in events if e["event"] == "step") == 1


def test_each_process_reads_its_own_share_of_the_stream(shards: Path) -> None:
    raw = _streaming(Path("."), shards, Path("unused"))["data"] | WEBDATASET_COLUMNS
    config = build_config({"model": {"pretrained": "unused"}, "data": raw, "train": {"output_dir": "unused"}}).data
    columns = Columns(image="png", caption="txt", conditioning="conditioning.png")

    def captions_and_keys(rank: int) -> list[tuple[str, int]]:
        samples = StreamingSamples(config, seed=0, columns=columns)
        samples.bind(rank, 2, global_batch=4)
        samples.start_epoch(0)
        return [(s["caption"], s["key"][1]) for s in samples]

    first, second = captions_and_keys(0), captions_and_keys(1)
    assert len(first) == len(second) == 4  # 8 samples an epoch, half each
    assert {k for _, k in first} == {0, 2, 4, 6} and {k for _, k in second} == {1, 3, 5, 7}
    assert len({c for c, _ in first} | {c for c, _ in second}) > 4  # other rows, not the same ones twice


def test_two_processes_stream_and_resume(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    def launch(raw: dict, name: str) -> None:
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(build_config(raw)))
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                               "difftune", "train", str(path)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(_streaming(tiny_base, circles, tmp_path / "straight", max_steps=4), "straight")
    launch(_streaming(tiny_base, circles, tmp_path / "cut", max_steps=2), "cut")
    launch(_streaming(tiny_base, circles, tmp_path / "cut", max_steps=4), "resumed")
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert all((straight[k] == resumed[k]).all() for k in straight)


def test_streaming_settings_that_cannot_work_are_refused(tiny_base: Path, circles: Path, tmp_path: Path) -> None:
    raw = _streaming(tiny_base, circles, tmp_path / "run")
    del raw["data"]["max_samples"]
    with pytest.raises(ConfigError, match="streaming needs max_samples"):
        build_config(raw)
    raw = _streaming(tiny_base, circles, tmp_path / "run")
    raw["data"]["cache_latents"] = True
    with pytest.raises(ConfigError, match="cannot be used with cache_latents"):
        build_config(raw)


def test_a_missing_stream_column_is_named_before_models_load(tiny_base: Path, shards: Path, tmp_path: Path) -> None:
    raw = _streaming(tiny_base, shards, tmp_path / "run", max_steps=2)
    raw["data"].update({**WEBDATASET_COLUMNS, "conditioning_image_column": "hint.png"})
    with pytest.raises(DataError, match=r"data.conditioning_image_column = 'hint.png' is not a column"):
        train(build_config(raw))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bad_row_in_the_stream_is_named_or_skipped(tiny_base: Path, tmp_path: Path) -> None:
    data = write_fill_circles_webdataset(tmp_path / "shards", 6, 64, seed=0, shards=1)
    with tarfile.open(data / "shard-00000.tar", "a") as archive:  # a seventh sample whose target is not an image
        for name, payload in (("000006.png", b"not a png"), ("000006.conditioning.png", b"nor this"),
                              ("000006.txt", b"red circle with blue background")):
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
    raw = _streaming(tiny_base, data, tmp_path / "stops", max_steps=8)
    raw["data"].update({**WEBDATASET_COLUMNS, "max_samples": 7, "shuffle_buffer": 1})
    with pytest.raises(DataError, match=r"row 6 of process 0's share of the stream .*column 'png'.*unreadable image"):
        train(build_config(raw))
    raw["data"]["on_bad"] = "skip"
    raw["train"]["output_dir"] = str(tmp_path / "skips")
    assert train(build_config(raw)) is not None
    # resumed past a skipped row, the run reads the same rows as one that never stopped
    shard = data / "shard-00000.tar"
    with tarfile.open(shard) as archive:
        members = [(m, archive.extractfile(m).read()) for m in archive.getmembers()]
    with tarfile.open(shard, "w") as archive:  # the bad sample first: the cut run has read past it
        for member, payload in members[-3:] + members[:-3]:
            archive.addfile(member, io.BytesIO(payload))
    raw["train"].update(output_dir=str(tmp_path / "straight"), max_steps=6)
    train(build_config(raw))
    raw["train"].update(output_dir=str(tmp_path / "cut"), max_steps=2)
    train(build_config(raw))
    raw["train"]["max_steps"] = 6
    train(build_config(raw))
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert all((straight[k] == resumed[k]).all() for k in straight)
