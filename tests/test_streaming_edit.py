"""Edit training (kind "edit") from a stream (data.streaming): a streamed row carries its
references (none, one or a list) as the row read whole does, so the method sees the same
batches and the run the same loss; webdataset samples without a reference member train as
text-to-image, and a sample's several references are its numbered members; a resumed
streaming edit run ends as an unbroken one; a row with more references than the family's
edit pipeline takes is named, or skipped."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from conftest import WORDS, run_config
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from difftune.config import ConfigError, build_config
from difftune.data.build.writers import TarWriter
from difftune.data.sources import DataError
from difftune.families.flux.tiny import build_tiny_flux
from difftune.families.qwenimage_edit.tiny import build_tiny_qwenimage_edit
from difftune.training.events import read_events
from difftune.training.loop import train

COLOURS = ["red", "green", "blue", "yellow"]
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def kontext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("kontext") / "tiny-flux", WORDS + ["make", "the"], seed=0,
                           t5_length=32)


def _disc(colour: str, row: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((8 + row * 3, 10, 40 + row * 3, 42), fill=colour)
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _edit(row: int) -> tuple[Image.Image, Image.Image, str]:
    """Row `row`'s target, reference and instruction: its disc recoloured."""
    old, new = COLOURS[row % 4], COLOURS[(row + 1) % 4]
    return _disc(new, row), _disc(old, row), f"make the circle {new}"


def _seen_batches(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every batch the edit method conditions on from now on: its keys, each sample's
    references and the targets' pixels."""
    from difftune.methods.edit.method import Edit, batch_references

    seen: list[dict[str, Any]] = []
    real = Edit.condition

    def spy(self: Any, family: Any, parts: Any, trained: Any, batch: dict[str, Any], inputs: Any) -> Any:
        seen.append({"keys": [tuple(key) for key in batch["keys"]], "pixels": batch["pixels"].clone(),
                     "references": [[pixels.clone() for pixels in sample] for sample in batch_references(batch)]})
        return real(self, family, parts, trained, batch, inputs)

    monkeypatch.setattr(Edit, "condition", spy)
    return seen


def _losses(run: Path) -> list[float]:
    return [event["loss"] for event in read_events(run) if event["event"] == "step"]


def _streamed(raw: dict[str, Any], samples: int, buffer: int = 1) -> dict[str, Any]:
    raw["data"] |= {"streaming": True, "max_samples": samples, "shuffle_buffer": buffer}
    return raw


# --- a list-of-references column, streamed from parquet, as read whole ---------------------------


def _parquet_edits(folder: Path) -> Path:
    """Four edits in a parquet file, images embedded: row 0 two references (the disc, then a
    swatch of the new colour), row 1 none (a text-to-image caption), rows 2 and 3 one each."""
    columns: dict[str, list] = {"image": [], "reference_image": [], "text": []}
    for row in range(4):
        target, reference, text = _edit(row)
        references = [reference, Image.new("RGB", (64, 64), COLOURS[(row + 1) % 4])][: 2 if row == 0 else 1]
        if row == 1:
            references, text = None, f"{COLOURS[2]} circle with white background"
        for name, value in (("image", target), ("reference_image", references), ("text", text)):
            columns[name].append(value)
    features = datasets.Features({"image": datasets.Image(), "reference_image": datasets.List(datasets.Image()),
                                  "text": datasets.Value("string")})
    folder.mkdir(parents=True)
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(folder / "train.parquet"))
    return folder


def test_a_streamed_edit_parquet_trains_on_the_batches_read_whole_gives(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Qwen-Image-Edit Plus (several references a row). With one process, shuffle_buffer 1 and
    seed 0, the stream's batches are the rows read whole's first batches (the map-style
    order of 4 rows at seed 0 starts 0, 1), so both runs see the same samples, references
    and loss."""
    base = build_tiny_qwenimage_edit(tmp_path / "plus", WORDS, seed=0, plus=True)
    data = _parquet_edits(tmp_path / "edits")
    batches = _seen_batches(monkeypatch)
    first: dict[bool, dict[str, Any]] = {}
    for streaming in (False, True):
        raw = run_config(base, data, tmp_path / f"run-{streaming}", model={"family": "qwenimage_edit"},
                         train={"max_steps": 1, "learning_rate": 1e-2, "checkpoint_every": 10})
        raw["method"] = {"kind": "edit", "lora": {"rank": 4}}
        raw["validation"] = {"every": 100}
        raw["data"] |= {"max_samples": 4, "cache_latents": False, "cache_text": False}
        if streaming:
            raw["data"] |= {"streaming": True, "shuffle_buffer": 1}
        done = len(batches)
        assert train(build_config(raw)) is not None
        first[streaming] = batches[done]
    whole, stream = first[False], first[True]
    assert [len(sample) for sample in stream["references"]] == [2, 0]  # row 0's list, row 1 without one
    assert stream["keys"] == whole["keys"] == [(0, 0, 0), (0, 1, 0)]
    assert torch.equal(stream["pixels"], whole["pixels"])
    for ours, theirs in zip(stream["references"], whole["references"]):
        assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert stream["references"][0][0].shape[-2:] == (1024, 1024)  # Qwen-Image-Edit's own size, not the target's
    streamed, read_whole = _losses(tmp_path / "run-True"), _losses(tmp_path / "run-False")
    assert len(streamed) == 1 and streamed == pytest.approx(read_whole, rel=1e-6, abs=0)


# --- webdataset shards: a sample without a reference member; resume --------------------------------


def _edit_shards(folder: Path, rows: int, bare: tuple[int, ...] = ()) -> Path:
    """Webdataset shards of edits (KEY.png target, KEY.reference.png, KEY.txt); the samples
    in `bare` have no reference member (they train as text-to-image)."""
    folder.mkdir(parents=True)
    with TarWriter(folder / "shard-00000.tar") as archive:
        for row in range(rows):
            target, reference, text = _edit(row)
            key = f"{row:06d}"
            archive.add(f"{key}.png", _png(target))
            if row not in bare:
                archive.add(f"{key}.reference.png", _png(reference))
            archive.add(f"{key}.txt", text.encode())
    return folder


def _kontext_run(base: Path, data: Path, out: Path, steps: int) -> dict[str, Any]:
    raw = run_config(base, data, out, model={"family": "flux"},
                     train={"max_steps": steps, "checkpoint_every": 2, "learning_rate": 1e-2})
    raw["method"] = {"kind": "edit", "lora": {"rank": 4}}
    raw["data"] |= {"random_flip": True}
    raw["validation"] = {"every": 100}
    return raw


def test_streamed_webdataset_edits_train_without_a_reference_member_and_resume_exactly(
        kontext: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _edit_shards(tmp_path / "shards", 4, bare=(3,))
    columns = {"image_column": "png", "reference_image_column": "reference.png", "caption_column": "txt"}

    def config(out: str, steps: int) -> dict[str, Any]:
        raw = _streamed(_kontext_run(kontext, data, tmp_path / out, steps), samples=4, buffer=2)
        raw["data"] |= columns
        return raw

    seen = _seen_batches(monkeypatch)
    train(build_config(config("straight", 4)))  # two epochs of 4 samples at batch 2
    counts = sorted(len(sample) for batch in seen for sample in batch["references"])
    assert counts == [0] * 2 + [1] * 6  # each epoch: three samples with their reference, one without
    train(build_config(config("cut", 2)))
    train(build_config(config("cut", 4)))  # continued from its step-2 checkpoint
    straight, resumed = load_file(tmp_path / "straight" / "final" / LORA), load_file(tmp_path / "cut" / "final" / LORA)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    # a reference member no sample has: a misnamed column, said before any model loads
    raw = config("misnamed", 2)
    raw["data"]["reference_image_column"] = "ref.png"
    with pytest.raises(DataError, match=r"data.reference_image_column = 'ref.png': no sample of the first 100"):
        train(build_config(raw))
    assert not (tmp_path / "misnamed" / "checkpoints").exists()


# --- too many references -------------------------------------------------------------------------------


def _folder_edits(folder: Path, several: int) -> Path:
    """A metadata.jsonl folder of four edits, each a list of references: one each, and two in
    row `several` (FLUX.1 Kontext takes one)."""
    folder.mkdir(parents=True)
    lines = []
    for row in range(4):
        target, reference, text = _edit(row)
        target.save(folder / f"target-{row}.png")
        reference.save(folder / f"reference-{row}.png")
        references = [f"reference-{row}.png"] + ([f"target-{(row + 1) % 4}.png"] if row == several else [])
        lines.append(json.dumps({"file_name": f"target-{row}.png", "reference_image": references, "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_a_streamed_row_with_too_many_references_is_named_or_skipped(kontext: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from difftune.training.setup import preflight

    data = _folder_edits(tmp_path / "second", several=1)
    raw = _streamed(_kontext_run(kontext, data, tmp_path / "stops", 2), samples=4)
    with pytest.raises(DataError, match=r"row 1 of process 0's share of the stream \(epoch 0\), column "
                                        r"'reference_image': 2 reference images, and FluxKontextPipeline takes 1"):
        train(build_config(raw))
    seen = _seen_batches(monkeypatch)
    raw = _streamed(_kontext_run(kontext, data, tmp_path / "skips", 2), samples=4)
    raw["data"]["on_bad"] = "skip"
    assert train(build_config(raw)) is not None
    counts = [len(sample) for batch in seen for sample in batch["references"]]
    assert counts == [1, 1, 1, 1]  # row 1 passed over, the stream starting over in its place
    # the first row: found before any model loads (preflight loads none)
    first = _folder_edits(tmp_path / "first", several=0)
    config = build_config(_streamed(_kontext_run(kontext, first, tmp_path / "early", 2), samples=4))
    with pytest.raises(DataError, match=r"first row, column 'reference_image': 2 reference images"):
        preflight(config)


def test_streaming_an_edit_keeps_refusing_the_caches(kontext: Path, tmp_path: Path) -> None:
    data = _folder_edits(tmp_path / "edits", several=-1)
    raw = _streamed(_kontext_run(kontext, data, tmp_path / "run", 2), samples=4)
    assert build_config(raw).method.kind == "edit"  # no longer refused
    raw["data"]["cache_latents"] = True
    with pytest.raises(ConfigError, match="streaming reads each row as it trains; it cannot be used with "
                                          "cache_latents"):
        build_config(raw)


# --- several references a webdataset sample: numbered members ------------------------------------


def test_a_webdataset_sample_holds_several_references_as_numbered_members() -> None:
    from difftune.data.shards import KEY, SHARD, reference_cell

    sample = {KEY: "000007", SHARD: "shard-00000.tar", "png": b"t", "reference.10.png": b"c",
              "reference.2.png": b"b", "reference.0.png": b"a", "referencex.1.png": b"no", "txt": b"make"}
    assert reference_cell(sample, "reference.png") == [b"a", b"b", b"c"]  # by number, not by name
    assert reference_cell({KEY: "1", SHARD: "s.tar", "reference.png": b"one"}, "reference.png") == b"one"
    assert reference_cell({KEY: "1", SHARD: "s.tar", "png": b"t"}, "reference.png") is None
    assert reference_cell({"reference_image.0": "kept as it is"}, "reference_image") is None  # no webdataset row
    with pytest.raises(DataError, match=r"s.tar, sample 1: both a member 1.reference.png and numbered ones "
                                        r"\(1.reference.0.png\)"):
        reference_cell({KEY: "1", SHARD: "s.tar", "reference.png": b"x", "reference.0.png": b"y"}, "reference.png")


def test_streamed_webdataset_edits_with_numbered_references_train_as_the_parquet_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parquet edits above as webdataset shards: row 0's two references as
    KEY.reference.1.png and KEY.reference.0.png (written in that order), row 1 without one,
    rows 2 and 3 as KEY.reference.png. Both streams give the same first batch and loss."""
    base = build_tiny_qwenimage_edit(tmp_path / "plus", WORDS, seed=0, plus=True)
    parquet = _parquet_edits(tmp_path / "edits")
    shards = tmp_path / "shards"
    shards.mkdir()
    with TarWriter(shards / "shard-00000.tar") as archive:
        for row in range(4):
            target, reference, text = _edit(row)
            key = f"{row:06d}"
            archive.add(f"{key}.png", _png(target))
            if row == 0:
                archive.add(f"{key}.reference.1.png", _png(Image.new("RGB", (64, 64), COLOURS[1])))
                archive.add(f"{key}.reference.0.png", _png(reference))
            elif row == 1:
                text = f"{COLOURS[2]} circle with white background"
            else:
                archive.add(f"{key}.reference.png", _png(reference))
            archive.add(f"{key}.txt", text.encode())
    batches = _seen_batches(monkeypatch)
    first: dict[str, dict[str, Any]] = {}
    for name, data, columns in (("parquet", parquet, {}),
                                ("shards", shards, {"image_column": "png", "reference_image_column": "reference.png",
                                                    "caption_column": "txt"})):
        raw = run_config(base, data, tmp_path / f"run-{name}", model={"family": "qwenimage_edit"},
                         train={"max_steps": 1, "learning_rate": 1e-2, "checkpoint_every": 10})
        raw["method"] = {"kind": "edit", "lora": {"rank": 4}}
        raw["validation"] = {"every": 100}
        raw["data"] |= columns
        _streamed(raw, samples=4)
        done = len(batches)
        assert train(build_config(raw)) is not None
        first[name] = batches[done]
    ours, theirs = first["shards"], first["parquet"]
    assert [len(sample) for sample in ours["references"]] == [2, 0]
    assert torch.equal(ours["pixels"], theirs["pixels"])
    for mine, other in zip(ours["references"], theirs["references"]):
        assert len(mine) == len(other) and all(torch.equal(a, b) for a, b in zip(mine, other))
    assert _losses(tmp_path / "run-shards") == pytest.approx(_losses(tmp_path / "run-parquet"), rel=1e-6, abs=0)
