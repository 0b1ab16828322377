"""The dataset scanner: every bad input named by row, column, file and kind."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from difftune.config import DataConfig
from difftune.data.check import KINDS, check_dataset, scan_rows, write_report
from difftune.data.sources import Columns, DataError

# row -> (column, file, kind, fatal) injected by `broken` below; row 12 is appended.
EXPECTED = {
    1: ("image", "images/000001.png", "truncated", True),
    2: ("conditioning_image", "conditioning_images/000002.png", "zero_byte", True),
    3: ("conditioning_image", "conditioning_images/000003.png", "missing_file", True),
    4: ("conditioning_image", "conditioning_images/000004.png", "size_mismatch", True),
    5: ("image", "images/000005.png", "too_small", False),
    6: ("image", "images/000006.jpg", "cmyk", False),
    7: ("image", "images/000007.png", "sixteen_bit", False),
    8: ("conditioning_image", "conditioning_images/000008.png", "palette", False),
    9: ("image", "images/000009.png", "alpha", False),
    10: ("text", None, "empty_caption", True),
    11: ("image", "images/000011.png", "duplicate", False),
    12: ("image", "images/000012.png", "unreadable", True),
}
BAD_ROWS = [row for row, (*_, fatal) in EXPECTED.items() if fatal]


def _metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _write_metadata(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _png_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, circles: Path) -> Path:
    """A copy of `circles` with one problem per row (see EXPECTED); row 0 stays clean."""
    folder = shutil.copytree(circles, tmp_path_factory.mktemp("check") / "broken")
    images, hints = folder / "images", folder / "conditioning_images"
    rows = _metadata(folder)

    png = (images / "000001.png").read_bytes()
    (images / "000001.png").write_bytes(png[: len(png) // 2])
    (hints / "000002.png").write_bytes(b"")
    (hints / "000003.png").unlink()
    Image.open(hints / "000004.png").resize((32, 32)).save(hints / "000004.png")
    for name in (images / "000005.png", hints / "000005.png"):
        Image.open(name).resize((32, 32)).save(name)
    Image.open(images / "000006.png").convert("CMYK").save(images / "000006.jpg")
    (images / "000006.png").unlink()
    rows[6]["file_name"] = "images/000006.jpg"
    grey = np.asarray(Image.open(images / "000007.png").convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(images / "000007.png")  # mode I;16
    Image.open(hints / "000008.png").convert("P").save(hints / "000008.png")
    Image.open(images / "000009.png").convert("RGBA").save(images / "000009.png")
    rows[10]["text"] = "  "
    shutil.copyfile(images / "000000.png", images / "000011.png")
    (images / "000012.png").write_text("not an image, only named like one\n")
    shutil.copyfile(hints / "000000.png", hints / "000012.png")
    rows.append({"file_name": "images/000012.png", "conditioning_image": "conditioning_images/000012.png",
                 "text": "red circle with blue background"})
    _write_metadata(folder, rows)
    return folder


def _config(folder: Path, **values) -> DataConfig:
    return DataConfig(path=str(folder), resolution=64, **values)


def _by_row(report) -> dict[int, list]:
    found: dict[int, list] = {}
    for finding in report.findings:
        found.setdefault(finding.row, []).append(finding)
    return found


def test_full_scan_names_every_injected_problem(broken: Path) -> None:
    report = check_dataset(_config(broken), needs_conditioning=True, full=True)
    assert report.rows == 13 and report.full
    assert report.checked_columns == ["image", "conditioning_image", "text"]
    found = _by_row(report)
    assert sorted(found) == sorted(EXPECTED), report.summary()
    for row, (column, file, kind, fatal) in EXPECTED.items():
        [finding] = found[row]
        assert (finding.column, finding.file, finding.kind, finding.fatal) == (column, file, kind, fatal), finding
        assert finding.kind in KINDS and finding.message
    assert report.bad_rows() == BAD_ROWS and not report.ok
    assert report.counts() == {kind: 1 for _, _, kind, _ in EXPECTED.values()}
    assert "row 0" in found[11][0].message  # the duplicate names the first row
    assert "64x64" in found[4][0].message and "32x32" in found[4][0].message
    assert "2.00x" in found[5][0].message  # 32 px upscaled to 64


def test_report_round_trips_through_json_and_summarises(broken: Path, tmp_path: Path) -> None:
    report = check_dataset(_config(broken), needs_conditioning=True)
    data = json.loads(json.dumps(report.to_json()))
    assert data == report.to_json()
    assert data["bad_rows"] == BAD_ROWS and len(data["findings"]) == len(EXPECTED)
    written = write_report(report, tmp_path / "reports" / "data.json")
    assert json.loads(written.read_text()) == data
    assert not list(written.parent.glob("*.tmp"))
    summary = report.summary()
    assert "13 rows, 6 bad" in summary
    for row, (column, file, kind, _) in EXPECTED.items():
        assert kind in summary and f"row {row}, {column}" in summary
        assert file is None or file in summary


def test_fast_scan_reads_headers_only(broken: Path) -> None:
    report = check_dataset(_config(broken), needs_conditioning=True, full=False)
    assert not report.full
    kinds = {(f.row, f.kind) for f in report.findings}
    # PIL's verify() walks a PNG's chunks and their CRCs, so half a PNG is caught too.
    assert {(1, "truncated"), (2, "zero_byte"), (3, "missing_file"), (4, "size_mismatch"),
            (12, "unreadable"), (10, "empty_caption")} <= kinds
    assert {(5, "too_small"), (6, "cmyk"), (7, "sixteen_bit"), (8, "palette"), (9, "alpha")} <= kinds
    # Duplicates need every byte hashed: full scans only.
    assert (11, "duplicate") not in kinds
    assert report.bad_rows() == BAD_ROWS


def test_fast_scan_misses_a_truncated_jpeg(tmp_path: Path, circles: Path) -> None:
    """verify() checks nothing past a JPEG's header; only decoding finds the cut."""
    folder = shutil.copytree(circles, tmp_path / "jpeg")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    (folder / "images" / "000000.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 3 // 4])
    (folder / "images" / "000000.png").unlink()
    rows = _metadata(folder)
    rows[0]["file_name"] = "images/000000.jpg"
    _write_metadata(folder, rows)
    fast = check_dataset(_config(folder), needs_conditioning=True, full=False)
    full = check_dataset(_config(folder), needs_conditioning=True, full=True)
    assert fast.findings == []
    assert [(f.row, f.file, f.kind) for f in full.findings] == [(0, "images/000000.jpg", "truncated")]


@pytest.mark.parametrize("full", [True, False])
def test_clean_dataset_has_no_findings(circles: Path, full: bool) -> None:
    report = check_dataset(_config(circles, max_samples=3), needs_conditioning=True, full=full)
    assert report.rows == 12  # max_samples is ignored: the whole split is scanned
    assert report.findings == [] and report.ok and report.bad_rows() == []
    assert "no problems found" in report.summary()


def test_missing_column_still_raises(circles: Path) -> None:
    with pytest.raises(DataError, match="data.conditioning_image_column = 'hint'"):
        check_dataset(_config(circles, conditioning_image_column="hint"), needs_conditioning=True)


def test_caption_folder_with_an_empty_caption_file(tmp_path: Path) -> None:
    folder = tmp_path / "subject"
    folder.mkdir()
    for index, caption in enumerate(["a photo of sks dog", "", "sks dog on grass"]):
        Image.new("RGB", (64, 64), "red").save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(caption)
    Image.new("RGB", (64, 64), "blue").save(folder / "1.png")  # not a duplicate of 0.png
    Image.new("RGB", (64, 64), "green").save(folder / "2.png")
    report = check_dataset(_config(folder), needs_conditioning=False)
    assert [(f.row, f.column, f.kind, f.fatal) for f in report.findings] == [(1, "text", "empty_caption", True)]
    # With a fixed prompt the caption column is unused: the same cell is only a note.
    fixed = check_dataset(_config(folder), needs_conditioning=False, fixed_caption="a photo of sks dog")
    assert [(f.row, f.kind, f.fatal) for f in fixed.findings] == [(1, "empty_caption", False)]
    assert fixed.ok


def test_in_memory_cells_and_caption_types() -> None:
    image = Image.new("RGB", (64, 64), "red")
    good = _png_bytes(image)
    rows = datasets.Dataset.from_dict({
        "image": [good, b"", good, _png_bytes(image, transparency=(255, 0, 0))],
        "hint": [7, 7, 7, 7],
        "text": [["a", "b"], [], ["c"], ["  "]],
        "number": [1, 2, 3, 4],
    })
    columns = Columns(image="image", caption="text", conditioning=None)
    config = _config(Path("."), caption_column="text")
    report = scan_rows(rows, columns, config, Path("."), full=True)
    found = {(f.row, f.column, f.file, f.kind, f.fatal) for f in report.findings}
    assert found == {
        (1, "image", None, "zero_byte", True),
        (1, "text", None, "empty_caption", True),
        (2, "image", None, "duplicate", False),
        (3, "image", None, "alpha", False),
        (3, "text", None, "empty_caption", True),
    }
    numbers = scan_rows(rows, Columns("image", "number", None), config, Path("."), full=False)
    assert {(f.row, f.kind) for f in numbers.findings if f.column == "number"} == {
        (row, "bad_caption") for row in range(4)
    }
    hinted = scan_rows(rows, Columns("image", None, "hint"), config, Path("."), full=False)
    assert {(f.row, f.kind) for f in hinted.findings if f.column == "hint"} == {
        (row, "not_an_image_cell") for row in range(4)
    }


def test_empty_split_is_one_dataset_wide_finding() -> None:
    rows = datasets.Dataset.from_dict({"image": [], "text": []})
    report = scan_rows(rows, Columns("image", "text", None), _config(Path(".")), Path("."), full=True)
    [finding] = report.findings
    assert (finding.row, finding.kind, finding.fatal) == (-1, "no_rows", True)
    assert report.bad_rows() == [] and not report.ok


def _png16_rgb(width: int, height: int) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand: PIL cannot save one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    line = b"\x00" + np.full((width, 3), 0x1234, ">u2").tobytes()
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(line * height))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("full", [True, False])
def test_sixteen_bit_rgb_png_is_noted(full: bool) -> None:
    """PIL opens it as plain RGB (keeping the high bytes); only the PNG's raw mode tells."""
    rows = datasets.Dataset.from_dict({"image": [_png16_rgb(64, 64)], "text": ["a"]})
    report = scan_rows(rows, Columns("image", "text", None), _config(Path(".")), Path("."), full=full)
    [finding] = report.findings
    assert (finding.kind, finding.fatal) == ("sixteen_bit", False) and "high byte" in finding.message


def _three_bad_files(circles: Path, target: Path) -> Path:
    """A truncated PNG (row 1), a zero-byte file (row 2), a missing conditioning file (row 3)."""
    broken = shutil.copytree(circles, target)
    png = (broken / "images" / "000001.png").read_bytes()
    (broken / "images" / "000001.png").write_bytes(png[: len(png) // 2])
    (broken / "images" / "000002.png").write_bytes(b"")
    (broken / "conditioning_images" / "000003.png").unlink()
    return broken


def test_training_stops_before_any_model_loads_naming_each_bad_file(
    monkeypatch, tiny_base: Path, circles: Path, tmp_path: Path
) -> None:
    from conftest import run_config

    from difftune.config import build_config
    from difftune.families.sd.family import StableDiffusion
    from difftune.training.loop import Run

    def no_models(*args, **kwargs):
        raise AssertionError("a model loaded before the data check")

    monkeypatch.setattr(StableDiffusion, "load", no_models)
    broken = _three_bad_files(circles, tmp_path / "broken")
    with pytest.raises(DataError) as caught:
        Run(build_config(run_config(tiny_base, broken, tmp_path / "run")))
    message = str(caught.value)
    assert "bad rows: 1, 2, 3" in message
    for expected in ("row 1, image, images/000001.png", "row 2, image, images/000002.png: the file is empty",
                     "row 3, conditioning_image, conditioning_images/000003.png: no such file"):
        assert expected in message


def test_on_bad_skip_trains_on_the_rest_and_logs_every_skipped_file(
    tiny_base: Path, circles: Path, tmp_path: Path
) -> None:
    from conftest import run_config

    from difftune.config import build_config
    from difftune.training.events import read_events
    from difftune.training.loop import Run

    broken = _three_bad_files(circles, tmp_path / "broken")
    raw = run_config(tiny_base, broken, tmp_path / "run", data={"on_bad": "skip"}, train={"max_steps": 2})
    run = Run(build_config(raw))
    assert run.sampler.size == 9
    run.fit()
    check = [e for e in read_events(tmp_path / "run") if e["event"] == "data_check"][0]
    assert check["skipped_rows"] == [1, 2, 3] and check["trained_rows"] == 9
    assert {(f["row"], f["kind"]) for f in check["skipped"]} == {(1, "truncated"), (2, "zero_byte"), (3, "missing_file")}
    report = json.loads((tmp_path / "run" / "data-check.json").read_text())
    assert report["bad_rows"] == [1, 2, 3]
