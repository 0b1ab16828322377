"""The control-fidelity metric on images with known answers, and in a run."""

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config
from PIL import Image, ImageDraw

from difftune.config import build_config
from difftune.data.synthetic import Circle, draw_conditioning, draw_target
from difftune.metrics import FillCirclesEdit, FillCirclesIoU, enclosed_region, iou, mean_scores
from difftune.training.events import read_events
from difftune.training.loop import Run

METRIC = FillCirclesIoU()
CIRCLE = Circle(32, 32, 16, "red", "blue")


def _disc_iou(radius: float, shift: float) -> float:
    """Analytic IoU of two equal discs whose centres are `shift` apart."""
    overlap = 2 * radius**2 * math.acos(shift / (2 * radius)) - shift / 2 * math.sqrt(4 * radius**2 - shift**2)
    return overlap / (2 * math.pi * radius**2 - overlap)


def test_perfect_disc_scores_one() -> None:
    scores = METRIC.score(draw_target(CIRCLE, 64), draw_conditioning(CIRCLE, 64), CIRCLE.caption)
    assert scores == {"control_iou": 1.0, "colour_iou": 1.0}


def test_a_thick_outline_outlines_the_same_disc() -> None:
    """Outlines drawn wider (for a VAE that loses thin lines) are drawn inwards: the metric
    finds the same disc, and the ring is as wide as asked."""
    thick = draw_conditioning(CIRCLE, 64, width=6)
    assert METRIC.score(draw_target(CIRCLE, 64), thick, CIRCLE.caption) == {"control_iou": 1.0, "colour_iou": 1.0}
    row = np.asarray(thick.convert("L"))[CIRCLE.y] > 127
    assert row.sum() == 2 * 6 and np.asarray(draw_conditioning(CIRCLE, 64).convert("L"))[CIRCLE.y].sum() == 2 * 255


@pytest.mark.parametrize("shift", [4, 8, 16])
def test_shifted_disc_scores_its_true_iou(shift: int) -> None:
    moved = Circle(32 + shift, 32, 16, "red", "blue")
    scores = METRIC.score(draw_target(moved, 64), draw_conditioning(CIRCLE, 64), CIRCLE.caption)
    assert scores["control_iou"] == pytest.approx(_disc_iou(16, shift), abs=0.03)
    assert scores["colour_iou"] == pytest.approx(_disc_iou(16, shift), abs=0.03)


def test_wrong_colours_keep_control_but_lose_colour() -> None:
    for fg, bg in [("blue", "red"), ("green", "yellow")]:
        drawn = Circle(32, 32, 16, fg, bg)
        scores = METRIC.score(draw_target(drawn, 64), draw_conditioning(CIRCLE, 64), CIRCLE.caption)
        assert scores["control_iou"] == 1.0
        assert scores["colour_iou"] < 0.05


def test_no_disc_and_unparsable_prompt() -> None:
    plain = Image.new("RGB", (64, 64), "blue")
    scores = METRIC.score(plain, draw_conditioning(CIRCLE, 64), "")
    assert scores["control_iou"] == 0.0 and math.isnan(scores["colour_iou"])
    assert mean_scores([scores, {"control_iou": 1.0, "colour_iou": 0.5}]) == {"control_iou": 0.5, "colour_iou": 0.5}


def test_enclosed_region_of_a_circle_touching_two_edges() -> None:
    corner = Circle(16, 16, 16, "white", "black")
    outline = np.asarray(draw_conditioning(corner, 64).convert("L")) > 127
    filled = np.asarray(draw_target(corner, 64).convert("L")) > 127
    assert iou(enclosed_region(outline), filled) > 0.95
    assert not enclosed_region(outline)[0, 0] and not enclosed_region(outline)[63, 63]


def test_run_logs_metric_and_floor(tiny_base: Path, circles: Path, held_out: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", train={"max_steps": 2})
    raw["validation"] |= {"metric": "fill_circles", "metric_data": str(held_out), "metric_samples": 2}
    Run(build_config(raw)).fit()
    validations = [e for e in read_events(tmp_path / "run") if e["event"] == "validation"]
    assert [v["step"] for v in validations] == [2]
    assert set(validations[0]["metrics"]) == {"control_iou", "colour_iou"}
    assert set(validations[0]["floor"]) == {"control_iou", "colour_iou"}
    assert 0.0 <= validations[0]["metrics"]["control_iou"] <= 1.0
    sheet = Image.open(tmp_path / "run" / "validation" / "step-000002" / "metric-grid.png")
    assert sheet.width == 384 and sheet.height > 384  # 2 conditionings over 2 outputs, scaled 3x, captioned
    assert (tmp_path / "run" / "validation" / "floor" / "metric-grid.png").is_file()
    report = (tmp_path / "run" / "report.html").read_text()
    assert report.count("<svg") == 4  # loss, learning rate, throughput, metrics against the floor
    assert "floor control_iou" in report and report.count("data:image/png;base64,") == 2  # floor and step-2 metric grids


def test_metric_needs_data() -> None:
    from difftune.config import ConfigError

    with pytest.raises(ConfigError, match="metric = 'fill_circles' needs metric_data"):
        build_config({"model": {"pretrained": "b"}, "data": {"path": "d"}, "train": {"output_dir": "o"},
                      "validation": {"metric": "fill_circles"}})


def _scene(offset: int = 0) -> Image.Image:
    image = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10 + offset, 12, 40 + offset, 50), fill="white")
    draw.ellipse((30, 5, 58, 30), fill="gray")
    return image


def test_canny_edge_f1_known_answers() -> None:
    from difftune.metrics import CannyEdgeF1, canny_edges

    metric = CannyEdgeF1()
    edges = Image.fromarray((canny_edges(_scene()) * 255).astype(np.uint8)).convert("RGB")
    assert metric.score(_scene(), edges, "")["edge_f1"] == pytest.approx(1.0)
    shifted = metric.score(_scene(offset=8), edges, "")["edge_f1"]
    assert 0.2 < shifted < 0.8  # the ellipse still matches, the moved rectangle does not
    assert metric.score(Image.new("RGB", (64, 64), "black"), edges, "")["edge_f1"] == 0.0


EDIT = FillCirclesEdit()
REFERENCE = Circle(32, 32, 16, "blue", "yellow")  # A = blue on B = yellow
TARGET = Circle(32, 32, 16, "red", "yellow")  # C = red: "make the circle red"


def _disc_in(colour: str | tuple[int, int, int], circle: Circle = TARGET, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), circle.background)
    scale = size / 64
    box = tuple(round(v * scale) for v in circle.box)
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    return image


def test_edit_true_target_and_unedited_reference() -> None:
    reference = draw_target(REFERENCE, 64)
    assert EDIT.score(draw_target(TARGET, 64), reference, "make the circle red") == {
        "shape_iou": 1.0, "colour_accuracy": 1.0}
    # Returning the reference untouched keeps the shape and misses the edit.
    assert EDIT.score(reference, reference, "make the circle red") == {"shape_iou": 1.0, "colour_accuracy": 0.0}
    # Any other colour than the prompted one is wrong, the background's included.
    assert EDIT.score(draw_target(TARGET, 64), reference, "Make the circle green.")["colour_accuracy"] == 0.0


def test_edit_generated_at_another_size_is_resized_to_the_reference() -> None:
    scores = EDIT.score(_disc_in("red", size=128), draw_target(REFERENCE, 64), "make the circle red")
    assert scores["shape_iou"] > 0.95 and scores["colour_accuracy"] == 1.0


@pytest.mark.parametrize("shift", [8, 16])
def test_edit_blank_or_shifted_disc_loses_shape(shift: int) -> None:
    reference = draw_target(REFERENCE, 64)
    blank = EDIT.score(Image.new("RGB", (64, 64), "yellow"), reference, "make the circle red")
    assert blank == {"shape_iou": 0.0, "colour_accuracy": 0.0}  # colour read over the reference's disc: yellow
    moved = Circle(32 + shift, 32, 16, "red", "yellow")
    scores = EDIT.score(draw_target(moved, 64), reference, "make the circle red")
    assert scores["shape_iou"] == pytest.approx(_disc_iou(16, shift), abs=0.03)
    assert scores["shape_iou"] < 0.65 and scores["colour_accuracy"] == 1.0


def test_edit_colour_near_misses() -> None:
    reference = draw_target(REFERENCE, 64)
    near_red = EDIT.score(_disc_in((220, 35, 30)), reference, "make the circle red")
    assert near_red == {"shape_iou": 1.0, "colour_accuracy": 1.0}
    # Red turned towards orange: past halfway it is orange's, not red's.
    assert EDIT.score(_disc_in((255, 120, 0)), reference, "make the circle red")["colour_accuracy"] == 0.0
    assert EDIT.score(_disc_in((255, 120, 0)), reference, "make the circle orange")["colour_accuracy"] == 1.0
    # A slightly dull yellow on orange (the palette's closest pair, 0.204 apart) is still a
    # disc: 0.18 from orange, under FillCirclesIoU's 0.2 but over half the closest gap.
    on_orange = Circle(32, 32, 16, "green", "orange")
    scores = EDIT.score(_disc_in((245, 240, 20), on_orange), draw_target(on_orange, 64), "make the circle yellow")
    assert scores == {"shape_iou": 1.0, "colour_accuracy": 1.0}
    # A colour outside the palette is judged among the palette and itself.
    assert EDIT.score(_disc_in("crimson"), reference, "make the circle crimson")["colour_accuracy"] == 1.0
    assert EDIT.score(_disc_in("red"), reference, "make the circle crimson")["colour_accuracy"] == 0.0


def test_edit_prompt_it_cannot_read_is_named() -> None:
    reference = draw_target(REFERENCE, 64)
    with pytest.raises(ValueError, match="'red circle with yellow background'"):
        EDIT.score(reference, reference, "red circle with yellow background")
    with pytest.raises(ValueError, match="'make the circle blurple'"):
        EDIT.score(reference, reference, "make the circle blurple")


def test_edit_metric_is_a_validation_choice() -> None:
    from difftune.metrics import METRICS

    assert METRICS["fill_circles_edit"].name == "fill_circles_edit"
    config = build_config({"model": {"pretrained": "b"}, "data": {"path": "d"}, "train": {"output_dir": "o"},
                           "validation": {"metric": "fill_circles_edit", "metric_data": "held"}})
    assert config.validation.metric == "fill_circles_edit"
