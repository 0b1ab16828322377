"""The data verbs (prepare, condition, caption) trust nothing they read: a file_name, a
link or a derived output name never leads out of IN or OUT; a second run into the same
OUT with other settings replaces the old output whole (never mixes with it, never loses
it when stopped); numeric flags out of range are refused, naming the flag, before any
work starts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftune.cli import main
from difftune.data.build import conditioning as conditioning_module
from difftune.data.build import output as output_module
from difftune.data.build import prepare as prepare_module
from difftune.data.build import writers as writers_module
from difftune.data.build.captioning import CaptionSettings, caption
from difftune.data.build.conditioning import ConditionSettings, canny_file, condition
from difftune.data.build.filters import FilterSettings, measure
from difftune.data.build.prepare import prepare
from difftune.errors import DataError, UserError


def _noise(path: Path, seed: int, size: tuple[int, int] = (64, 64), form: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=form)
    return path


def _tree(folder: Path) -> dict[str, str]:
    return {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and not f.is_symlink()}


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _write_rows(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _outside(tmp_path: Path, out: Path) -> dict[str, str]:
    """Every file under tmp_path but OUT: what a verb must not write."""
    return {name: digest for name, digest in _tree(tmp_path).items()
            if not (tmp_path / name).is_relative_to(out)}


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files prepare measures (reads), resolved."""
    files: list[Path] = []

    def recording(item):
        files.append(item.file.resolve())
        if item.conditioning is not None:
            files.append(item.conditioning.resolve())
        return measure(item)

    monkeypatch.setattr(prepare_module, "measure", recording)
    return files


# --- paths stay inside IN and OUT ---------------------------------------------------


def test_prepare_drops_metadata_rows_that_point_outside_in(tmp_path: Path, measured: list[Path]) -> None:
    secret = _noise(tmp_path / "secret.png", seed=9)
    raw = tmp_path / "raw"
    _noise(raw / "a.png", seed=1)
    _noise(raw / "kept" / "c.png", seed=3)
    os.symlink(raw / "kept" / "c.png", raw / "c-link.png")  # inside IN, to inside IN: fine
    os.symlink(secret, raw / "outside-link.png")
    _write_rows(raw, [{"file_name": "a.png"}, {"file_name": "../secret.png"}, {"file_name": str(secret)},
                      {"file_name": "outside-link.png"}, {"file_name": "images/../../secret.png"},
                      {"file_name": "./c-link.png"}])
    before = _outside(tmp_path, tmp_path / "out")
    report = prepare(raw, tmp_path / "out", workers=1)
    dropped = {d["file"]: (d["reason"], d["detail"]) for d in report["dropped"]}
    assert {name: reason for name, (reason, _) in dropped.items()} == {
        "../secret.png": "outside_input", str(secret): "outside_input", "outside-link.png": "outside_input",
        "images/../../secret.png": "outside_input"}
    expected = f"{raw / 'metadata.jsonl'}, row 2: file_name '../secret.png' points outside IN"
    assert dropped["../secret.png"][1] == expected
    assert all(f.is_relative_to(raw.resolve()) for f in measured), measured  # nothing outside IN was read
    assert {r["file_name"] for r in _rows(tmp_path / "out")} == {"images/a.png", "images/c-link.png"}
    assert _outside(tmp_path, tmp_path / "out") == before


def test_prepare_drops_a_conditioning_image_named_outside_in(tmp_path: Path, measured: list[Path]) -> None:
    _noise(tmp_path / "secret.png", seed=9)
    raw = tmp_path / "raw"
    for name in ("a", "b"):
        _noise(raw / f"{name}.png", seed=ord(name))
        _noise(raw / "hints" / f"{name}.png", seed=ord(name) + 10)
    _write_rows(raw, [{"file_name": "a.png", "conditioning_image_file_name": "hints/a.png"},
                      {"file_name": "b.png", "conditioning_image_file_name": "hints/../../secret.png"}])
    report = prepare(raw, tmp_path / "out", workers=1)
    assert [(d["file"], d["reason"]) for d in report["dropped"]] == [("b.png", "outside_input")]
    assert report["dropped"][0]["detail"].endswith(
        "row 2: conditioning_image_file_name 'hints/../../secret.png' points outside IN")
    assert all(f.is_relative_to(raw.resolve()) for f in measured), measured
    assert _rows(tmp_path / "out") == [{"file_name": "images/a.png",
                                        "conditioning_image_file_name": "conditioning_images/a.png"}]


def test_prepare_drops_scanned_links_and_captions_that_point_outside(tmp_path: Path, measured: list[Path]) -> None:
    elsewhere = tmp_path / "elsewhere"
    _noise(elsewhere / "secret.png", seed=9)
    (elsewhere / "secret.txt").write_text("a secret caption")
    raw, hints = tmp_path / "raw", tmp_path / "hints"
    for index in range(3):
        _noise(raw / f"{index}.png", seed=index)
        _noise(hints / f"{index}.png", seed=10 + index)
    os.symlink(elsewhere / "secret.png", raw / "3.png")
    os.symlink(elsewhere / "secret.txt", raw / "1.txt")  # 1.png's caption, from outside
    (hints / "2.png").unlink()
    os.symlink(elsewhere / "secret.png", hints / "2.png")  # 2.png's conditioning image, from outside
    os.symlink(hints / "0.png", hints / "3.png")
    report = prepare(raw, tmp_path / "out", conditioning=hints, workers=1)
    dropped = {d["file"]: (d["reason"], d["detail"]) for d in report["dropped"]}
    assert {name: reason for name, (reason, _) in dropped.items()} == {
        "1.png": "outside_input", "2.png": "outside_input", "3.png": "outside_input"}
    assert "caption file" in dropped["1.png"][1] and "points outside IN" in dropped["1.png"][1]
    assert "points outside --conditioning" in dropped["2.png"][1]
    assert all(f.is_relative_to(raw.resolve()) or f.is_relative_to(hints.resolve()) for f in measured)
    assert "a secret caption" not in (tmp_path / "out" / "metadata.jsonl").read_text()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A prepared dataset of three images, and a secret beside it."""
    raw = tmp_path / "raw"
    for index in range(3):
        _noise(raw / f"{index}.png", seed=index)
        (raw / f"{index}.txt").write_text(f"caption {index}")
    _noise(tmp_path / "secret.png", seed=9)
    prepare(raw, tmp_path / "data", workers=1)
    return tmp_path / "data"


@pytest.mark.parametrize("bad", ["../secret.png", "images/../../secret.png", "ABSOLUTE", "images/link.png"])
def test_condition_and_caption_refuse_a_row_outside_in(dataset: Path, tmp_path: Path, bad: str) -> None:
    if bad == "ABSOLUTE":
        bad = str(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", dataset / "images" / "link.png")
    rows = _rows(dataset)
    _write_rows(dataset, rows[:2] + [{"file_name": bad, "text": "x"}] + rows[2:])
    metadata = (dataset / "metadata.jsonl").read_bytes()
    message = f"metadata.jsonl, row 3: file_name '{bad}' points outside IN"
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        condition(dataset, tmp_path / "canny", ConditionSettings(), workers=1)
    assert not (tmp_path / "canny").exists()
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        caption(dataset, CaptionSettings(model=str(tmp_path / "no-model")))
    assert (dataset / "metadata.jsonl").read_bytes() == metadata


def test_a_metadata_file_or_bookkeeping_folder_linked_outside_in_is_refused(dataset: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (dataset / "metadata.jsonl").rename(elsewhere / "metadata.jsonl")
    os.symlink(elsewhere / "metadata.jsonl", dataset / "metadata.jsonl")
    for run in (lambda: prepare(dataset, tmp_path / "out", workers=1),
                lambda: condition(dataset, tmp_path / "out", ConditionSettings(), workers=1)):
        with pytest.raises(DataError, match=r"metadata\.jsonl is a link that points outside IN"):
            run()
        assert not (tmp_path / "out").exists()
    (dataset / "metadata.jsonl").unlink()
    (elsewhere / "metadata.jsonl").rename(dataset / "metadata.jsonl")
    shutil.rmtree(dataset / ".difftune")
    os.symlink(elsewhere, dataset / ".difftune")  # caption writes its journal and backup there
    with pytest.raises(DataError, match=r"\.difftune is a link that points outside IN"):
        caption(dataset, CaptionSettings(model=str(tmp_path / "no-model"), overwrite=True))
    assert list(elsewhere.iterdir()) == []


def test_two_inputs_never_write_one_output_file(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _noise(raw / "a.png", seed=1)
    _noise(raw / "images" / "a.png", seed=2)  # laid out as images/...: its output name is images/a.png too
    _noise(raw / "b.jpg", seed=3, form="JPEG")
    _noise(raw / "b.png", seed=4)
    report = prepare(raw, tmp_path / "out", workers=1)
    assert {d["file"]: d["reason"] for d in report["dropped"]} == {"images/a.png": "name_clash"}
    assert "a.png" in report["dropped"][0]["detail"]
    rows = _rows(tmp_path / "out")
    assert len(rows) == report["counts"]["kept"] == 3
    for row in rows:  # each listed file is its own input's bytes
        source = raw / row["file_name"].removeprefix("images/")
        assert (tmp_path / "out" / row["file_name"]).read_bytes() == source.read_bytes()
    # b.jpg and b.png would both have conditioning_images/b.png
    with pytest.raises(DataError, match=r"rows 2 and 3: .*conditioning_images/b\.png"):
        condition(tmp_path / "out", tmp_path / "canny", ConditionSettings(), workers=1)
    assert not (tmp_path / "canny").exists()


@pytest.mark.parametrize("name, message", [
    ("conditioning_images/0.png", r"rows 4 and 1: the image 'conditioning_images/0\.png' is where row 1's"),
    (".difftune/job.png", r"row 4: file_name '\.difftune/job\.png' names difftune's own file"),
])
def test_condition_never_writes_an_image_over_its_own_files(dataset: Path, tmp_path: Path, name: str,
                                                            message: str) -> None:
    _noise(dataset / name, seed=5)
    _write_rows(dataset, _rows(dataset) + [{"file_name": name, "text": "x"}])
    with pytest.raises(DataError, match=message):
        condition(dataset, tmp_path / "canny", ConditionSettings(), workers=1)
    assert not (tmp_path / "canny").exists()


def test_an_output_folder_never_holds_or_is_an_input(dataset: Path, tmp_path: Path) -> None:
    for out in (dataset, dataset / "canny"):
        with pytest.raises(UserError, match="would write over IN"):
            condition(dataset, out, ConditionSettings(), workers=1)
    with pytest.raises(UserError, match="holds IN"):
        condition(dataset, tmp_path, ConditionSettings(), workers=1)
    with pytest.raises(UserError, match="holds --conditioning"):
        prepare(tmp_path / "raw", tmp_path / "hints-parent", conditioning=_hints_in(tmp_path / "hints-parent"))


def _hints_in(folder: Path) -> Path:
    _noise(folder / "hints" / "0.png", seed=0)
    return folder / "hints"


# --- a second run replaces the first whole, or resumes it ---------------------------


def test_prepare_again_with_another_form_replaces_the_output_whole(tmp_path: Path, measured: list[Path]) -> None:
    raw = tmp_path / "raw"
    for index in range(6):
        _noise(raw / f"{index}.png", seed=index)
    out = tmp_path / "out"
    prepare(raw, out, form="webdataset", shard_size=2, workers=1)
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-0000{i}.tar" for i in range(3)]
    measured.clear()
    prepare(raw, out, form="webdataset", shard_size=4, workers=1)
    assert sorted(p.name for p in out.iterdir()) == [".difftune", "shard-00000.tar", "shard-00001.tar"]
    prepare(raw, out, form="imagefolder", workers=1)
    assert sorted(p.name for p in out.iterdir()) == [".difftune", "images", "metadata.jsonl"]
    prepare(raw, out, form="hf", workers=1)
    assert not (out / "images").exists() and not (out / "metadata.jsonl").exists()
    assert measured == []  # the measures are the same whatever the settings: kept, not redone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no staging folder left


def test_a_stopped_replacement_leaves_the_old_output_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw"
    for index in range(6):
        _noise(raw / f"{index}.png", seed=index)
    out = tmp_path / "out"
    prepare(raw, out, workers=1)
    before = _tree(out)
    added: list[str] = []
    original = writers_module.TarWriter.add_image

    def stopping(self, key, path, as_png):
        if len(added) == 3:
            raise KeyboardInterrupt
        added.append(key)
        original(self, key, path, as_png)

    monkeypatch.setattr(writers_module.TarWriter, "add_image", stopping)
    with pytest.raises(KeyboardInterrupt):
        prepare(raw, out, form="webdataset", shard_size=2, workers=1)
    assert _tree(out) == before  # the old dataset, untouched
    monkeypatch.setattr(writers_module.TarWriter, "add_image", original)
    prepare(raw, out, form="webdataset", shard_size=2, workers=1)  # the same command again: done
    assert sorted(p.name for p in out.iterdir()) == [".difftune", *(f"shard-0000{i}.tar" for i in range(3))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_a_swap_cut_short_between_its_renames_is_finished_by_the_next_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "raw"
    for index in range(4):
        _noise(raw / f"{index}.png", seed=index)
    out = tmp_path / "out"
    prepare(raw, out, workers=1)

    def first_rename_only(staging: Path, final: Path) -> None:
        os.replace(final, final.parent / f".{final.name}.difftune-old")
        raise KeyboardInterrupt  # killed between the two renames

    monkeypatch.setattr(output_module, "swap_in", first_rename_only)
    with pytest.raises(KeyboardInterrupt):
        prepare(raw, out, form="webdataset", workers=1)
    assert not out.exists()
    monkeypatch.undo()
    report = prepare(raw, out, form="webdataset", workers=1)  # finds the complete new output, puts it in place
    assert report["counts"]["kept"] == 4
    assert sorted(p.name for p in out.iterdir()) == [".difftune", "shard-00000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_a_job_file_difftune_did_not_write_is_refused(tmp_path: Path) -> None:
    _noise(tmp_path / "raw" / "0.png", seed=0)
    (tmp_path / "out" / ".difftune").mkdir(parents=True)
    (tmp_path / "out" / ".difftune" / "job.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"job\.json is not a job file difftune wrote"):
        prepare(tmp_path / "raw", tmp_path / "out")


def test_a_changed_input_of_the_same_size_is_copied_again(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    _noise(raw / "a.bmp", seed=1, form="BMP")
    _noise(raw / "b.bmp", seed=2, form="BMP")
    prepare(raw, tmp_path / "out", workers=1)
    _noise(raw / "a.bmp", seed=3, form="BMP")  # another picture, the same number of bytes
    prepare(raw, tmp_path / "out", workers=1)
    assert (tmp_path / "out" / "images" / "a.bmp").read_bytes() == (raw / "a.bmp").read_bytes()


def test_condition_again_with_other_settings_never_mixes_them(dataset: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "canny"
    condition(dataset, out, ConditionSettings(low=10, high=20), workers=1)
    before = _tree(out)
    made: list[str] = []

    def stopping(task):
        if len(made) == 2:
            raise KeyboardInterrupt
        made.append(task[1].name)
        return canny_file(task)

    monkeypatch.setattr(conditioning_module, "canny_file", stopping)
    with pytest.raises(KeyboardInterrupt):
        condition(dataset, out, ConditionSettings(low=200, high=250), workers=1)
    assert _tree(out) == before
    monkeypatch.setattr(conditioning_module, "canny_file", canny_file)
    manifest = condition(dataset, out, ConditionSettings(low=200, high=250), workers=1)
    assert (manifest["low"], manifest["high"]) == (200, 250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canny", "data", "raw", "secret.png"]
    for row in _rows(out):
        expected = canny_file((out / row["file_name"], tmp_path / "expected.png", 200, 250))
        assert expected == {"low": 200, "high": 250}
        assert (out / row["conditioning_image_file_name"]).read_bytes() == (tmp_path / "expected.png").read_bytes()


# --- numeric flags ------------------------------------------------------------------


PREPARE = ["data", "prepare", "IN", "OUT"]
CONDITION = ["data", "condition", "DATA", "OUT", "--kind", "canny"]
CAPTION = ["data", "caption", "DATA", "--model", "MODEL"]
BAD_FLAGS = [
    (PREPARE, "--shard-size", "0"), (PREPARE, "--shard-size", "-5"), (PREPARE, "--min-size", "-1"),
    (PREPARE, "--max-aspect", "0.5"), (PREPARE, "--max-aspect", "nan"), (PREPARE, "--max-aspect", "inf"),
    (PREPARE, "--min-sharpness", "-1"), (PREPARE, "--min-sharpness", "nan"),
    (PREPARE, "--min-bytes-per-megapixel", "nan"), (PREPARE, "--min-bytes-per-megapixel", "-1"),
    (PREPARE, "--phash-distance", "-2"), (PREPARE, "--phash-distance", "65"),
    (PREPARE, "--workers", "0"), (PREPARE, "--workers", "-1"),
    (CONDITION, "--batch-size", "0"), (CONDITION, "--jitter", "-1"), (CONDITION, "--workers", "0"),
    (CONDITION, "--min-score", "nan"), (CONDITION, "--min-score", "-0.5"), (CONDITION, "--min-score", "inf"),
    (CAPTION, "--batch-size", "0"), (CAPTION, "--batch-size", "-1"), (CAPTION, "--max-new-tokens", "0"),
]


@pytest.mark.parametrize("verb, flag, value", BAD_FLAGS)
def test_a_numeric_flag_out_of_range_is_refused_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          verb: list[str], flag: str, value: str) -> None:
    raw, data = tmp_path / "raw", tmp_path / "data"
    _noise(raw / "0.png", seed=0)
    _noise(data / "images" / "0.png", seed=0)
    _write_rows(data, [{"file_name": "images/0.png", "text": ""}])
    places = {"IN": str(raw), "OUT": str(tmp_path / "out"), "DATA": str(data), "MODEL": str(tmp_path / "model")}
    assert main([places.get(a, a) for a in verb] + [f"{flag}={value}"]) == 2
    error = capsys.readouterr().err
    assert f"{flag} {value}" in error and len(error.strip().splitlines()) == 1, error
    assert not (tmp_path / "out").exists() and not (data / ".difftune").exists()


def test_the_library_refuses_the_same_limits(tmp_path: Path) -> None:
    _noise(tmp_path / "raw" / "0.png", seed=0)
    with pytest.raises(UserError, match="--shard-size 0"):
        prepare(tmp_path / "raw", tmp_path / "out", shard_size=0)
    with pytest.raises(UserError, match="--min-size -3"):
        prepare(tmp_path / "raw", tmp_path / "out", FilterSettings(min_size=-3))
    with pytest.raises(UserError, match="--batch-size 0"):
        condition(tmp_path / "raw", tmp_path / "out", ConditionSettings(batch_size=0))
    assert not (tmp_path / "out").exists()
