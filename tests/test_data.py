import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from difftune.config import DataConfig
from difftune.data import DataError, EpochSampler, collate, open_training_data
from difftune.data.synthetic import (
    draw_conditioning,
    draw_target,
    random_circle,
    write_fill_circles,
)
from difftune.data.transforms import paired_transform


def _copy_circles(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metadata.jsonl").read_text().splitlines()]


def test_fill_circles_layout_and_captions(circles: Path) -> None:
    rows = _rows(circles)
    assert len(rows) == 12
    first = rows[0]
    assert set(first) == {"file_name", "conditioning_image", "text"}
    assert first["text"].endswith(" background") and " circle with " in first["text"]
    image = Image.open(circles / first["file_name"])
    conditioning = np.asarray(Image.open(circles / first["conditioning_image"]).convert("L"))
    assert image.size == (64, 64)
    assert set(np.unique(conditioning)) <= set(range(256)) and conditioning.max() == 255


def test_circle_drawing_agrees_between_outline_and_fill() -> None:
    circle = random_circle(random.Random(3), 64, ["red", "blue"])
    outline = np.asarray(draw_conditioning(circle, 64).convert("L")) > 127
    target = np.asarray(draw_target(circle, 64))
    foreground = np.all(target == (255, 0, 0), axis=-1) if circle.foreground == "red" else np.all(target == (0, 0, 255), axis=-1)
    rows, cols = np.nonzero(outline)
    # the outline's bounding box is the filled disc's bounding box
    frows, fcols = np.nonzero(foreground)
    assert abs(rows.min() - frows.min()) <= 1 and abs(cols.max() - fcols.max()) <= 1


def test_paired_transform_ranges_and_shared_geometry() -> None:
    image = Image.fromarray(np.tile(np.arange(96, dtype=np.uint8), (64, 1))).convert("RGB")  # 96x64
    pixels, conditioning, geometry = paired_transform(image, image.copy(), 32, False, True, random.Random(0))
    assert pixels.shape == conditioning.shape == (3, 32, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1 and conditioning.min() >= 0 and conditioning.max() <= 1
    # same crop and flip on both: the target is exactly the conditioning rescaled
    assert torch.allclose(pixels, conditioning * 2 - 1, atol=1e-6)
    # 96x64 covers 32x32 at 48x32: original (h, w), crop (top, left) mirrored, target (h, w)
    original_h, original_w, top, left, target_h, target_w = geometry.tolist()
    assert (original_h, original_w, top, target_h, target_w) == (64, 96, 0, 32, 32)
    assert 0 <= left <= 16
    unflipped = paired_transform(image, None, 32, True, False, None)[2]
    assert unflipped.tolist() == [64, 96, 0, 8, 32, 32]  # the centre of 48: left 8


def test_open_training_data_reads_imagefolder(circles: Path) -> None:
    samples = open_training_data(DataConfig(path=str(circles), resolution=32), seed=0, needs_conditioning=True)
    sample = samples[(0, 3)]
    assert sample["pixels"].shape == (3, 32, 32)
    assert sample["conditioning_pixels"].shape == (3, 32, 32)
    assert sample["caption"] == _rows(circles)[3]["text"]
    batch = collate([samples[(0, 0)], samples[(0, 1)]])
    assert batch["pixels"].shape == (2, 3, 32, 32) and len(batch["captions"]) == 2


def test_hf_dataset_with_image_columns_and_column_mapping(tmp_path: Path, circles: Path) -> None:
    rows = _rows(circles)
    table = datasets.Dataset.from_dict(
        {
            "target": [str(circles / r["file_name"]) for r in rows],
            "hint": [str(circles / r["conditioning_image"]) for r in rows],
            "prompt": [[r["text"], "other"] for r in rows],
        }
    ).cast_column("target", datasets.Image()).cast_column("hint", datasets.Image())
    table.to_parquet(str(tmp_path / "train.parquet"))
    config = DataConfig(path=str(tmp_path), resolution=32, image_column="target",
                        conditioning_image_column="hint", caption_column="prompt", max_samples=5)
    samples = open_training_data(config, seed=0, needs_conditioning=True)
    assert len(samples) == 5
    assert samples[(0, 0)]["caption"] in {*(r["text"] for r in rows), "other"}


def test_missing_column_names_the_key(circles: Path) -> None:
    config = DataConfig(path=str(circles), conditioning_image_column="hint")
    with pytest.raises(DataError, match=r"data.conditioning_image_column = 'hint' is not a column.*conditioning_image"):
        open_training_data(config, seed=0, needs_conditioning=True)


def test_missing_and_unreadable_conditioning_files_are_named(tmp_path: Path, circles: Path) -> None:
    broken = _copy_circles(circles, tmp_path / "broken")
    (broken / "conditioning_images" / "000002.png").unlink()
    (broken / "conditioning_images" / "000005.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as caught:
        open_training_data(DataConfig(path=str(broken)), seed=0, needs_conditioning=True)
    message = str(caught.value)
    assert "2 row(s)" in message and "bad rows: 2, 5" in message
    assert "row 2, conditioning_image, conditioning_images/000002.png: no such file" in message
    assert "row 5, conditioning_image, conditioning_images/000005.png" in message and "unreadable" in message


def test_empty_prompt_proportion_and_determinism(circles: Path) -> None:
    always = open_training_data(DataConfig(path=str(circles), resolution=32, proportion_empty_prompts=1.0), 0, True)
    assert all(always[(0, i)]["caption"] == "" for i in range(len(always)))
    half = open_training_data(DataConfig(path=str(circles), resolution=32, proportion_empty_prompts=0.5), 0, True)
    first = [half[(0, i)]["caption"] for i in range(12)]
    assert first == [half[(0, i)]["caption"] for i in range(12)]  # same (epoch, index) -> same draw
    assert 0 < sum(c == "" for c in first) < 12


def test_epoch_sampler_is_seeded_and_resumable() -> None:
    sampler = EpochSampler(10, seed=4)
    sampler.start_epoch(1)
    full = list(sampler)
    sampler.start_epoch(1, skip=6)
    assert list(sampler) == full[6:]
    sampler.start_epoch(2)
    assert [i for _, i in sampler] != [i for _, i in full]
    assert sorted(i for _, i in full) == list(range(10))


def test_fill_circles_is_reproducible(tmp_path: Path) -> None:
    a = write_fill_circles(tmp_path / "a", 3, 32, seed=7)
    b = write_fill_circles(tmp_path / "b", 3, 32, seed=7)
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    assert (a / "images" / "000002.png").read_bytes() == (b / "images" / "000002.png").read_bytes()


def test_bad_target_images_in_imagefolder_are_named(tmp_path: Path, circles: Path) -> None:
    broken = _copy_circles(circles, tmp_path / "broken")
    (broken / "images" / "000003.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=r"row 3, image, images/000003.png: not an image"):
        open_training_data(DataConfig(path=str(broken)), seed=0, needs_conditioning=True)


def test_binary_image_columns_are_read(tmp_path: Path, circles: Path) -> None:
    rows = _rows(circles)
    table = datasets.Dataset.from_dict({
        "image": [(circles / r["file_name"]).read_bytes() for r in rows],
        "conditioning_image": [(circles / r["conditioning_image"]).read_bytes() for r in rows],
        "text": [r["text"] for r in rows],
    })
    table.to_parquet(str(tmp_path / "train.parquet"))
    samples = open_training_data(DataConfig(path=str(tmp_path), resolution=32), seed=0, needs_conditioning=True)
    assert samples[(0, 0)]["conditioning_pixels"].shape == (3, 32, 32)
