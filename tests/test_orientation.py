"""One image orientation everywhere: a phone photo (pixels stored sideways, an EXIF
orientation tag saying how to turn them) is measured, conditioned, checked, bucketed and
trained upright, the way every viewer shows it."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from difftune.config import DataConfig
from difftune.data.buckets import assign_bucket, bucket_sizes, image_size
from difftune.data.build.conditioning import ConditionSettings, condition
from difftune.data.build.prepare import prepare
from difftune.data.cells import ImageScanner
from difftune.data.check import check_dataset
from difftune.data.images import open_oriented, oriented_size
from difftune.data.training import open_training_data

ORIENTATION = 0x0112
STORED = (64, 32)
"""The phone photo's pixels as stored: 64 wide, 32 high; with orientation 6 it shows 32x64."""


def _phone_photo(path: Path, orientation: int = 6, form: str = "JPEG") -> Image.Image:
    """Save noise (edges for Canny) with an EXIF orientation; returns it as it displays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(orientation).integers(0, 255, (STORED[1], STORED[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, format=form, exif=exif, **({"quality": 95} if form == "JPEG" else {}))
    with Image.open(path) as saved:
        return ImageOps.exif_transpose(saved).convert("RGB")


def _exif_after_pixels(png: bytes) -> bytes:
    """The same PNG with its eXIf chunk moved after the image data (the PNG spec allows it;
    PIL then finds it only when the pixels are read)."""
    chunks, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        chunks.append(png[at:at + 12 + length])
        at += 12 + length
    exif = [c for c in chunks if c[4:8] == b"eXIf"]
    rest = [c for c in chunks if c[4:8] != b"eXIf"]
    assert len(exif) == 1 and rest[-1][4:8] == b"IEND"
    return png[:8] + b"".join(rest[:-1] + exif + rest[-1:])


@pytest.mark.parametrize("form", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_oriented_size_is_the_size_exif_transpose_gives_without_decoding(
        tmp_path: Path, orientation: int, form: str) -> None:
    upright = _phone_photo(tmp_path / f"photo.{form.lower()}", orientation, form)
    with Image.open(tmp_path / f"photo.{form.lower()}") as image:
        assert oriented_size(image) == upright.size
        assert image._im is None, "the pixels were decoded to read the size"
    assert open_oriented(tmp_path / f"photo.{form.lower()}").size == upright.size


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_a_png_whose_exif_follows_its_pixels_is_turned_too(tmp_path: Path, orientation: int) -> None:
    _phone_photo(tmp_path / "photo.png", orientation, "PNG")
    moved = _exif_after_pixels((tmp_path / "photo.png").read_bytes())
    with Image.open(io.BytesIO(moved)) as image:
        assert "exif" not in image.info  # not seen when the header is read
        size = oriented_size(image)
        assert image._im is None, "the pixels were decoded to read the size"
    with Image.open(io.BytesIO(moved)) as image:
        assert size == ImageOps.exif_transpose(image).size == open_oriented(io.BytesIO(moved)).size


def test_a_png_with_a_broken_trailing_exif_fails_as_decoding_fails() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", STORED).save(buffer, format="PNG")
    png = buffer.getvalue()
    junk = b"\x00" * 5
    chunk = len(junk).to_bytes(4, "big") + b"eXIf" + junk + zlib.crc32(b"eXIf" + junk).to_bytes(4, "big")
    broken = png[:-12] + chunk + png[-12:]
    outcomes = []
    for read in (oriented_size, lambda image: ImageOps.exif_transpose(image).size):
        with Image.open(io.BytesIO(broken)) as image:
            try:
                outcomes.append(read(image))
            except Exception as error:  # noqa: BLE001 (whatever PIL raises, both must raise it)
                outcomes.append(type(error))
    assert outcomes[0] == outcomes[1]


def test_the_data_check_and_buckets_see_the_photo_upright(tmp_path: Path) -> None:
    upright = _phone_photo(tmp_path / "phone.jpg")
    assert upright.size == (32, 64)
    for full in (False, True):
        findings, scanned = ImageScanner(tmp_path, full).scan("phone.jpg", 0, "image", hashed=False)
        assert scanned is not None and scanned.size == (32, 64), f"full={full}"
    assert image_size("phone.jpg", tmp_path, "row 0") == (32, 64)
    assert image_size({"bytes": (tmp_path / "phone.jpg").read_bytes(), "path": None}, tmp_path, "row 0") == (32, 64)
    sizes = bucket_sizes(32, 8, 2.0)
    width, height = assign_bucket(image_size("phone.jpg", tmp_path, "row 0"), sizes, False, 8)
    assert height > width  # a portrait bucket for a portrait photo


def _dataset_with_a_phone_photo(tmp_path: Path) -> tuple[Path, Image.Image]:
    """prepare (with conditioning images of the photo's displayed size) then condition."""
    raw, hints = tmp_path / "raw", tmp_path / "hints"
    upright = _phone_photo(raw / "phone.jpg")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(raw / "square.png")
    (raw / "phone.txt").write_text("a portrait")
    (raw / "square.txt").write_text("a square")
    hints.mkdir()
    Image.new("L", upright.size, 255).save(hints / "phone.png")
    Image.new("L", (64, 64), 255).save(hints / "square.png")
    report = prepare(raw, tmp_path / "prepared", conditioning=hints, workers=1)
    assert report["counts"]["kept"] == 2, report["dropped"]
    condition(tmp_path / "prepared", tmp_path / "canny", ConditionSettings(low=50, high=150), workers=1)
    return tmp_path / "canny", upright


def test_prepare_condition_check_and_training_agree_on_a_phone_photo(tmp_path: Path) -> None:
    canny, upright = _dataset_with_a_phone_photo(tmp_path)
    rows = [json.loads(line) for line in (canny / "metadata.jsonl").read_text().splitlines()]
    phone = next(r for r in rows if r["file_name"].endswith("phone.jpg"))
    with Image.open(canny / phone["conditioning_image_file_name"]) as edges:
        assert edges.size == (32, 64)
        assert np.array_equal(np.asarray(edges), cv2.Canny(np.asarray(upright), 50, 150))

    for folder in (tmp_path / "prepared", canny):
        report = check_dataset(DataConfig(path=str(folder), resolution=32), needs_conditioning=None)
        assert not report.findings, report.summary()

    config = DataConfig(path=str(canny), resolution=32, buckets=True, bucket_step=8)
    samples = open_training_data(config, seed=0, needs_conditioning=True)
    index = [r["file_name"] for r in rows].index(phone["file_name"])
    image, hint = samples.images(index, index)
    assert np.array_equal(np.asarray(image), np.asarray(upright))
    assert np.array_equal(np.asarray(hint.convert("L")), cv2.Canny(np.asarray(upright), 50, 150))
    width, height = samples.size_of(index)
    assert height > width
    sample = samples[(0, index)]
    assert sample["pixels"].shape == sample["conditioning_pixels"].shape == (3, height, width)


def test_every_written_form_keeps_the_photo_upright(tmp_path: Path) -> None:
    canny, upright = _dataset_with_a_phone_photo(tmp_path)
    # a JPEG beside PNGs: webdataset writes every image as PNG, which must not lose the turn
    prepare(canny, tmp_path / "tars", form="webdataset", workers=1)
    with tarfile.open(tmp_path / "tars" / "shard-00000.tar") as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    for key in ("00000000", "00000001"):
        with Image.open(io.BytesIO(members[f"{key}.png"])) as image, \
                Image.open(io.BytesIO(members[f"{key}.conditioning.png"])) as hint:
            assert oriented_size(image) == hint.size
    with Image.open(io.BytesIO(members["00000000.png"])) as image:
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(image).convert("RGB")), np.asarray(upright))

    prepare(canny, tmp_path / "hf", form="hf", workers=1)
    report = check_dataset(DataConfig(path=str(tmp_path / "hf"), resolution=32), needs_conditioning=True)
    assert not report.findings, report.summary()


def test_validation_and_generate_turn_a_conditioning_photo_upright(tmp_path: Path) -> None:
    """Validation images and `generate --image` are conditioning images too: read as training reads them."""
    from difftune.config import ValidationConfig
    from difftune.generate import _conditioning
    from difftune.validation import load_validation_pairs

    shown = _phone_photo(tmp_path / "photo.png", form="PNG")  # lossless: pixels compare exactly
    (pair,) = load_validation_pairs(ValidationConfig(prompts=["p"], images=[str(tmp_path / "photo.png")]), 64)
    assert np.array_equal(np.asarray(pair.image), np.asarray(shown.resize((64, 64), Image.Resampling.BILINEAR)))
    assert np.array_equal(np.asarray(_conditioning(str(tmp_path / "photo.png"), None)), np.asarray(shown))
