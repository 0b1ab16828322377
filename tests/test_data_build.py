"""difftune data prepare | condition | caption: from a folder of raw images (a truncated
file, a duplicate and a tiny image among them) to a dataset `difftune train` takes as it
is, each step through the CLI as a user runs it, models built here and loaded with
transformers' from_pretrained."""

import hashlib
import json
from pathlib import Path

import cv2
import datasets
import numpy as np
import pytest
from conftest import run_config
from PIL import Image
from tiny_vision import tiny_blip, tiny_depth, tiny_segformer, tiny_vitpose

from difftune.cli import main
from difftune.config import build_config
from difftune.data.build import conditioning as conditioning_module
from difftune.data.build import prepare as prepare_module
from difftune.data.build.conditioning import ConditionSettings, canny_file, condition, thresholds
from difftune.data.build.filters import FilterSettings, measure
from difftune.data.build.prepare import prepare
from difftune.data.synthetic import RAW_BAD_FILES, write_raw_circles
from difftune.errors import UserError
from difftune.training.loop import train


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_blip(tmp_path_factory.mktemp("models") / "blip")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    prepare(write_raw_circles(root / "raw", 8, 64, seed=1), root / "prepared", workers=1)
    return root / "prepared"


def _tree(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _report(folder: Path, name: str = "prepare-report.json") -> dict:
    return json.loads((folder / ".difftune" / name).read_text())


def test_raw_images_become_a_dataset_that_trains(tiny_base: Path, blip: Path, tmp_path: Path) -> None:
    raw = write_raw_circles(tmp_path / "raw", 12, 64, seed=0)
    before = _tree(raw)
    assert main(["data", "prepare", str(raw), str(tmp_path / "prepared")]) == 0
    report = _report(tmp_path / "prepared")
    assert {d["file"]: d["reason"] for d in report["dropped"]} == RAW_BAD_FILES
    assert report["counts"] == {"input": 15, "kept": 12, "dropped": 3,
                                "dropped_by_reason": {"duplicate": 1, "too_small": 1, "unreadable": 1}}

    assert main(["data", "condition", str(tmp_path / "prepared"), str(tmp_path / "canny"), "--kind", "canny",
                 "--low", "50", "--high", "150"]) == 0
    rows = _rows(tmp_path / "canny")
    assert len(rows) == 12
    for row in rows:  # every edge map is OpenCV's, for the same image and thresholds
        image = np.asarray(Image.open(tmp_path / "canny" / row["file_name"]).convert("RGB"))
        edges = np.asarray(Image.open(tmp_path / "canny" / row["conditioning_image_file_name"]))
        assert np.array_equal(edges, cv2.Canny(image, 50, 150)) and edges.any()

    assert main(["data", "caption", str(tmp_path / "canny"), "--model", str(blip), "--overwrite",
                 "--prefix", "a photo: "]) == 0
    captions = [row["text"] for row in _rows(tmp_path / "canny")]
    assert all(c.startswith("a photo: ") for c in captions)
    assert captions != [row["text"] for row in rows]  # the model's, not the .txt files'

    run = train(build_config(run_config(tiny_base, tmp_path / "canny", tmp_path / "run", train={"max_steps": 2})))
    assert (run / "diffusion_pytorch_model.safetensors").is_file()
    assert _tree(raw) == before  # no input was touched


def test_prepare_never_writes_over_or_into_its_input(tmp_path: Path) -> None:
    raw = write_raw_circles(tmp_path / "raw", 4, 64, seed=0, bad_files=False)
    for out in (raw, raw / "out"):
        with pytest.raises(UserError, match="would write over IN"):
            prepare(raw, out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="files that difftune did not write"):
        prepare(raw, tmp_path / "other")
    assert main(["data", "prepare", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2


def test_a_stopped_prepare_measures_only_what_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_raw_circles(tmp_path / "raw", 6, 64, seed=0)
    calls: list[str] = []

    def stopping(item):  # stops at the fifth image, as a kill would
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(item.name)
        return measure(item)

    monkeypatch.setattr(prepare_module, "measure", stopping)
    with pytest.raises(KeyboardInterrupt):
        prepare(raw, tmp_path / "out", workers=1)
    assert not (tmp_path / "out" / "metadata.jsonl").exists()
    measured = list(calls)
    monkeypatch.setattr(prepare_module, "measure", lambda item: calls.append(item.name) or measure(item))
    report = prepare(raw, tmp_path / "out", workers=1)
    assert len(calls) == 9 and not set(calls[4:]) & set(measured)  # the other 5 of 9, once each
    assert report["counts"]["kept"] == 6


def test_near_duplicates_are_dropped_and_plain_colours_are_not(tmp_path: Path) -> None:
    raw = write_raw_circles(tmp_path / "raw", 6, 96, seed=0, bad_files=False)
    with Image.open(raw / "000002.png") as image:  # the same picture, smaller and as a JPEG
        image.resize((80, 80)).save(raw / "000002-small.jpg", quality=85)
    for name, colour in (("plain-red.png", "red"), ("plain-blue.png", "blue")):
        Image.new("RGB", (64, 64), colour).save(raw / name)
    report = prepare(raw, tmp_path / "out", workers=1)
    dropped = {d["file"]: d for d in report["dropped"]}
    assert list(dropped) == ["000002-small.jpg"] and dropped["000002-small.jpg"]["reason"] == "near_duplicate"
    assert "000002.png" in dropped["000002-small.jpg"]["detail"]
    off = prepare(raw, tmp_path / "kept", FilterSettings(phash_distance=-1), workers=1)
    assert off["counts"]["dropped"] == 0


def test_the_other_filters_each_name_their_reason(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(raw / "sharp.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).resize((16, 16)).resize(
        (64, 64), Image.Resampling.BICUBIC).save(raw / "soft.png")
    Image.fromarray(rng.integers(0, 255, (40, 200, 3), dtype=np.uint8)).save(raw / "banner.png")
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(raw / "squeezed.jpg", quality=1)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(raw / "latin1.png")
    (raw / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    settings = FilterSettings(min_sharpness=1000, min_bytes_per_megapixel=200_000)
    report = prepare(raw, tmp_path / "out", settings, workers=1)
    assert {d["file"]: d["reason"] for d in report["dropped"]} == {
        "soft.png": "blurry", "banner.png": "aspect", "squeezed.jpg": "low_bytes", "latin1.png": "bad_caption"}
    assert any("latin1.txt is not UTF-8" in d["detail"] for d in report["dropped"])


def test_prepare_writes_hf_and_webdataset_forms(tiny_base: Path, tmp_path: Path) -> None:
    raw = write_raw_circles(tmp_path / "raw", 6, 64, seed=0)
    prepare(raw, tmp_path / "images", workers=1)
    condition(tmp_path / "images", tmp_path / "canny", ConditionSettings())
    # a prepared dataset goes in again as it is: to the Hub's format and to tar shards
    assert prepare(tmp_path / "canny", tmp_path / "hf", form="hf")["counts"]["kept"] == 6
    rows = datasets.load_from_disk(str(tmp_path / "hf"))
    assert rows.column_names == ["image", "conditioning_image", "text"] and len(rows) == 6
    run = train(build_config(run_config(tiny_base, tmp_path / "hf", tmp_path / "run", train={"max_steps": 2})))
    assert run.is_dir()
    prepare(tmp_path / "canny", tmp_path / "tars", form="webdataset", shard_size=4)
    assert sorted(p.name for p in (tmp_path / "tars").glob("*.tar")) == ["shard-00000.tar", "shard-00001.tar"]
    stream = datasets.load_dataset("webdataset", data_dir=str(tmp_path / "tars"), split="train", streaming=True)
    first = next(iter(stream))
    assert {"png", "conditioning.png", "txt"} <= set(first)  # the JPEGs were made PNG: one column per image


def test_canny_jitter_draws_each_images_thresholds_and_records_them(prepared: Path, tmp_path: Path) -> None:
    settings = ConditionSettings(low=80, high=160, jitter=30, seed=3)
    manifest = condition(prepared, tmp_path / "out", settings)
    pairs = manifest["thresholds"]
    assert len(pairs) == 8 and len({tuple(p) for p in pairs.values()}) > 1
    for row in _rows(tmp_path / "out"):
        low, high = pairs[row["conditioning_image_file_name"]]
        assert (low, high) == thresholds(settings, row["file_name"])
        assert 50 <= low <= 110 and low <= high <= 190
        image = np.asarray(Image.open(tmp_path / "out" / row["file_name"]).convert("RGB"))
        edges = np.asarray(Image.open(tmp_path / "out" / row["conditioning_image_file_name"]))
        assert np.array_equal(edges, cv2.Canny(image, low, high))


@pytest.mark.parametrize("kind, build", [("depth", tiny_depth), ("segmentation", tiny_segformer),
                                         ("pose", tiny_vitpose)])
def test_model_kinds_draw_a_conditioning_image_per_image(kind: str, build, prepared: Path, tmp_path: Path) -> None:
    model = build(tmp_path / kind)
    assert main(["data", "condition", str(prepared), str(tmp_path / "out"), "--kind", kind, "--model", str(model),
                 "--batch-size", "3", "--min-score", "0"]) == 0
    rows = _rows(tmp_path / "out")
    assert len(rows) == 8
    for row in rows:
        with Image.open(tmp_path / "out" / row["file_name"]) as image, \
                Image.open(tmp_path / "out" / row["conditioning_image_file_name"]) as drawn:
            assert drawn.size == image.size and np.asarray(drawn).any()
    manifest = _report(tmp_path / "out", "condition-manifest.json")
    assert manifest["kind"] == kind and manifest["model"] == str(model)


def test_a_missing_or_wrong_model_is_named(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "condition", str(prepared), str(tmp_path / "a"), "--kind", "depth"]) == 2
    assert "--kind depth needs --model" in capsys.readouterr().err
    assert main(["data", "condition", str(prepared), str(tmp_path / "b"), "--kind", "depth", "--model",
                 str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["data", "caption", str(prepared), "--model", str(tmp_path / "nowhere"), "--overwrite"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_caption_keeps_existing_captions_unless_told(blip: Path, tmp_path: Path) -> None:
    raw = write_raw_circles(tmp_path / "raw", 4, 64, seed=0, bad_files=False)
    (raw / "000001.txt").unlink()
    (raw / "000002.txt").unlink()
    prepare(raw, tmp_path / "data", workers=1)
    before = _rows(tmp_path / "data")
    assert main(["data", "caption", str(tmp_path / "data"), "--model", str(blip), "--suffix", ", flat colours"]) == 0
    after = _rows(tmp_path / "data")
    assert [r.get("text") for r in after][0::3] == [r.get("text") for r in before][0::3]  # 0 and 3 kept theirs
    assert after[1]["text"].endswith(", flat colours") and after[2]["text"].endswith(", flat colours")
    kept = tmp_path / "data" / ".difftune" / "metadata.before-caption.jsonl"
    assert [json.loads(line) for line in kept.read_text().splitlines()] == before


def test_a_stopped_condition_resumes_and_a_second_prepare_keeps_only_what_it_lists(
        prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []

    def stopping(task):
        if len(made) == 3:
            raise KeyboardInterrupt
        made.append(task[1].name)
        return canny_file(task)

    monkeypatch.setattr(conditioning_module, "canny_file", stopping)
    with pytest.raises(KeyboardInterrupt):
        condition(prepared, tmp_path / "out", ConditionSettings(), workers=1)
    monkeypatch.setattr(conditioning_module, "canny_file", lambda task: made.append(task[1].name) or canny_file(task))
    condition(prepared, tmp_path / "out", ConditionSettings(), workers=1)
    assert len(made) == 8 and len(set(made)) == 8  # 3 before the stop, the other 5 after
    assert len(_rows(tmp_path / "out")) == 8

    raw = write_raw_circles(tmp_path / "raw", 6, 64, seed=0, bad_files=False)
    Image.new("RGB", (40, 40), "red").save(raw / "small.png")
    prepare(raw, tmp_path / "again", workers=1)
    assert (tmp_path / "again" / "images" / "small.png").is_file()
    prepare(raw, tmp_path / "again", FilterSettings(min_size=50), workers=1)  # run again, stricter
    listed = {row["file_name"] for row in _rows(tmp_path / "again")}
    on_disk = {f.relative_to(tmp_path / "again").as_posix() for f in (tmp_path / "again" / "images").rglob("*")}
    assert listed == on_disk and "images/small.png" not in listed


def test_a_failed_push_keeps_the_saved_dataset_and_says_how_to_push_it(prepared: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self, repo: str, *args, **kwargs) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", offline)
    with pytest.raises(UserError, match=r"--push-to-hub me/circles: ConnectionError: no network\. The dataset is "
                                        r"saved in .*hf; push it later"):
        prepare(prepared, tmp_path / "hf", form="hf", push_to_hub="me/circles")
    assert len(datasets.load_from_disk(str(tmp_path / "hf"))) == 8
