"""The fill-circles edit data: what write_fill_circles_edit writes, read back as a run
reads it, and scored by the fill_circles_edit metric."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageColor

from difftune.config.sections import DataConfig
from difftune.data.sources import load_rows
from difftune.data.synthetic import (
    DEMO_PALETTE,
    fill_circles_edit_rows,
    write_fill_circles_edit,
)
from difftune.metrics import METRICS, FillCirclesEdit, standout_mask

INSTRUCTION = re.compile(r"^make the circle (\w+)$")
CAPTION = re.compile(r"^(\w+) circle with (\w+) background$")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _disc_and_colours(image: Image.Image) -> tuple[np.ndarray, tuple, tuple]:
    """The disc mask, the disc's colour and the background's (the images are drawn flat)."""
    pixels = _pixels(image)
    disc = standout_mask(pixels.astype(np.float32) / 255, 0.1)
    return disc, tuple(pixels[disc][0]), tuple(pixels[~disc][0])


def _rgb(name: str) -> tuple:
    return ImageColor.getrgb(name)[:3]


def test_folder_loads_with_null_references_and_recoloured_discs(tmp_path: Path) -> None:
    out = write_fill_circles_edit(tmp_path / "edit", 8, 32, seed=3, without_reference=0.25)
    rows = load_rows(DataConfig(path=str(out)), seed=0)  # how a run opens data.path
    assert rows.column_names == ["image", "reference_image", "text"]
    references = rows["reference_image"]
    assert sum(r is None for r in references) == 2  # an exact fraction: round(8 * 0.25)
    for row in rows:
        target, reference, text = row["image"], row["reference_image"], row["text"]
        disc, colour, background = _disc_and_colours(target)
        if reference is None:
            # A row without a reference trains text-to-image: its text captions the target.
            fg, bg = CAPTION.match(text).groups()
            assert (colour, background) == (_rgb(fg), _rgb(bg))
            continue
        assert not Path(reference).is_absolute() and (out / reference).is_file()
        wanted = INSTRUCTION.match(text).group(1)
        assert colour == _rgb(wanted)
        ref_disc, ref_colour, ref_background = _disc_and_colours(Image.open(out / reference))
        assert disc.any() and np.array_equal(disc, ref_disc)  # the same disc ...
        assert ref_background == background  # ... on the same background ...
        assert len({ref_colour, colour, background}) == 3  # ... recoloured: A, B, C distinct
    # The bare rows wrote no reference file.
    assert len(list((out / "reference_images").iterdir())) == 6


def test_two_references_are_a_list_of_disc_and_swatch(tmp_path: Path) -> None:
    out = write_fill_circles_edit(tmp_path / "edit", 4, 32, seed=1, references=2, without_reference=0.25)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert sum(row["reference_image"] is None for row in rows) == 1
    for row in rows:
        if row["reference_image"] is None:
            continue
        disc_path, swatch_path = row["reference_image"]
        swatch = _pixels(Image.open(out / swatch_path))
        wanted = INSTRUCTION.match(row["text"]).group(1)
        assert (swatch == _rgb(wanted)).all()  # filled with C, nothing drawn on it
        assert _disc_and_colours(Image.open(out / disc_path))[0].any()


def test_deterministic_and_in_memory_rows_match(tmp_path: Path) -> None:
    first = write_fill_circles_edit(tmp_path / "a", 6, 32, seed=5, without_reference=0.5)
    again = write_fill_circles_edit(tmp_path / "b", 6, 32, seed=5, without_reference=0.5)
    other = write_fill_circles_edit(tmp_path / "c", 6, 32, seed=6, without_reference=0.5)
    text = (first / "metadata.jsonl").read_text()
    assert text == (again / "metadata.jsonl").read_text() != (other / "metadata.jsonl").read_text()
    assert (first / "images/000004.png").read_bytes() == (again / "images/000004.png").read_bytes()
    memory = fill_circles_edit_rows(6, 32, seed=5, without_reference=0.5)
    written = [json.loads(line) for line in text.splitlines()]
    assert memory["text"] == [row["text"] for row in written]
    for index, row in enumerate(written):
        assert (memory["reference_image"][index] is None) == (row["reference_image"] is None)
        assert np.array_equal(_pixels(memory["image"][index]), _pixels(Image.open(first / row["file_name"])))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 distinct colours"):
        fill_circles_edit_rows(2, 32, 0, colours=["red", "blue", "red"])
    with pytest.raises(ValueError, match="without_reference"):
        fill_circles_edit_rows(2, 32, 0, without_reference=1.5)
    with pytest.raises(ValueError, match="references = 3"):
        write_fill_circles_edit(tmp_path / "x", 2, 32, 0, references=3)


def test_metric_scores_the_written_pairs() -> None:
    rows = fill_circles_edit_rows(6, 48, seed=2)
    metric = METRICS["fill_circles_edit"]
    assert isinstance(metric, FillCirclesEdit) and metric.palette == DEMO_PALETTE
    for target, reference, text in zip(rows["image"], rows["reference_image"], rows["text"]):
        assert metric.score(target, reference, text) == {"shape_iou": 1.0, "colour_accuracy": 1.0}
        assert metric.score(reference, reference, text) == {"shape_iou": 1.0, "colour_accuracy": 0.0}

