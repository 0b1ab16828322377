"""Control-fidelity metrics: how well a generated image follows its conditioning image.

A metric is chosen by conditioning type (`[validation] metric`). Each scores one
generated image against its conditioning image and prompt, returning named values in
[0, 1]; validation averages them over its pairs.
"""

from __future__ import annotations

import re
from typing import Protocol

import numpy as np
from PIL import Image, ImageColor

from difftune.data.synthetic import DEMO_PALETTE

CAPTION = re.compile(r"^\s*(?P<fg>[a-z ]+?) circle with (?P<bg>[a-z ]+?) background\s*$")


class ControlMetric(Protocol):
    name: str

    def score(self, generated: Image.Image, conditioning: Image.Image, prompt: str) -> dict[str, float]: ...


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _rgb(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def _border(array: np.ndarray) -> np.ndarray:
    return np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])


def enclosed_region(outline: np.ndarray) -> np.ndarray:
    """Pixels not reachable from the image border without crossing the outline
    (the outline itself included): the filled shape an outline drawing encloses."""
    outside = np.zeros_like(outline)
    outside[[0, -1], :] = ~outline[[0, -1], :]
    outside[:, [0, -1]] = ~outline[:, [0, -1]]
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= ~outline
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def standout_mask(image: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """Pixels that stand apart from the background, taken as the border's median colour.
    Colour-blind on purpose: it finds the shape whatever colour it was drawn in."""
    background = np.median(_border(image), axis=0)
    distance = np.linalg.norm(image - background, axis=-1) / np.sqrt(3)
    return distance > threshold


def colour_mask(image: np.ndarray, foreground: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Pixels nearer the foreground colour than the background colour."""
    return np.linalg.norm(image - foreground, axis=-1) < np.linalg.norm(image - background, axis=-1)


def caption_colours(prompt: str) -> tuple[np.ndarray, np.ndarray] | None:
    match = CAPTION.match(prompt.lower())
    if match is None:
        return None
    try:
        fg, bg = (np.array(ImageColor.getrgb(match[k].replace(" ", ""))[:3], dtype=np.float32) / 255
                  for k in ("fg", "bg"))
    except ValueError:
        return None
    return fg, bg


class FillCirclesIoU:
    """fill-circles: IoU of the generated disc with the disc the conditioning outlines.

    control_iou finds the disc as what stands apart from the background, whatever its
    colour; colour_iou takes the pixels nearer the prompted circle colour than the
    prompted background colour (NaN when the prompt names no colours, e.g. "").
    """

    name = "fill_circles"

    def score(self, generated: Image.Image, conditioning: Image.Image, prompt: str) -> dict[str, float]:
        image = _rgb(generated)
        outline = _rgb(conditioning, generated.size).mean(axis=-1) > 0.5
        target = enclosed_region(outline)
        scores = {"control_iou": iou(standout_mask(image), target)}
        colours = caption_colours(prompt)
        scores["colour_iou"] = iou(colour_mask(image, *colours), target) if colours else float("nan")
        return scores


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edges (Canny 1986) with the thresholds of ControlNet's canny annotator."""
    import cv2

    gray = np.asarray(image.convert("L"), dtype=np.uint8)
    return cv2.Canny(gray, low, high) > 0


def _near(mask: np.ndarray, tolerance: int) -> np.ndarray:
    import cv2

    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def edge_f1(predicted: np.ndarray, reference: np.ndarray, tolerance: int = 2) -> float:
    """F1 of edge maps where a pixel within `tolerance` of an edge counts as a match
    (the boundary-matching idea of the BSDS benchmark, Martin et al. 2004, simplified)."""
    if not predicted.any() or not reference.any():
        return float(predicted.any() == reference.any())
    precision = (predicted & _near(reference, tolerance)).sum() / predicted.sum()
    recall = (reference & _near(predicted, tolerance)).sum() / reference.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


class CannyEdgeF1:
    """Canny conditioning: F1 between the generated image's Canny edges and the
    conditioning edge map (white edges on black)."""

    name = "canny_edge_f1"

    def score(self, generated: Image.Image, conditioning: Image.Image, prompt: str) -> dict[str, float]:
        reference = _rgb(conditioning, generated.size).mean(axis=-1) > 0.5
        return {"edge_f1": edge_f1(canny_edges(generated), reference)}


EDIT_PROMPT = re.compile(r"^\s*make the circle (?P<colour>[a-z ]+?)\s*\.?\s*$")


def palette_rgb(names: list[str]) -> np.ndarray:
    return np.array([ImageColor.getrgb(name)[:3] for name in names], dtype=np.float32) / 255


class FillCirclesEdit:
    """fill-circles edit ("make the circle C", data/synthetic.write_fill_circles_edit):
    did the model recolour the reference's disc, and only recolour it?

    Scores the generated image against the reference (the conditioning), resized to the
    reference's size. shape_iou: IoU of the two discs, each the pixels standing out from
    its own image's border colour. colour_accuracy: 1.0 when the generated disc's median
    colour (over its own disc, or over the reference's disc when it drew none) is nearer
    C than any other palette colour. The palette is the data's (DEMO_PALETTE by default,
    as write_fill_circles_edit's); C is added to it when the prompt names another PIL colour.
    """

    name = "fill_circles_edit"

    def __init__(self, palette: list[str] | None = None) -> None:
        self.palette = list(palette or DEMO_PALETTE)
        colours = palette_rgb(self.palette)
        gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) / np.sqrt(3)
        smallest = gaps[gaps > 0].min() if (gaps > 0).any() else 0.4
        # Halfway to the nearest other palette colour: DEMO_PALETTE's yellow and orange are
        # only 0.204 apart, so FillCirclesIoU's 0.2 would barely find a yellow disc on
        # orange; the floor keeps a dense palette (PIL's names) from counting noise as disc.
        self.threshold = float(np.clip(smallest / 2, 0.05, 0.2))

    def score(self, generated: Image.Image, conditioning: Image.Image, prompt: str) -> dict[str, float]:
        wanted = self.prompted_colour(prompt)
        reference = _rgb(conditioning)
        image = _rgb(generated, conditioning.size)
        reference_disc = standout_mask(reference, self.threshold)
        disc = standout_mask(image, self.threshold)
        scores = {"shape_iou": iou(disc, reference_disc)}
        where = disc if disc.any() else reference_disc
        if not where.any():  # no disc in either image: no colour to judge
            scores["colour_accuracy"] = float("nan")
            return scores
        colour = np.median(image[where], axis=0)
        names = self.palette + [wanted]
        distances = np.linalg.norm(palette_rgb(names) - colour, axis=-1)
        nearest = palette_rgb([names[int(distances.argmin())]])[0]
        # Compared as RGB, so an alias of C in the palette (grey for gray) counts as C.
        scores["colour_accuracy"] = float(np.array_equal(nearest, palette_rgb([wanted])[0]))
        return scores

    @staticmethod
    def prompted_colour(prompt: str) -> str:
        """C of "make the circle C" as a PIL colour name; a ValueError names the prompt."""
        match = EDIT_PROMPT.match(prompt.lower())
        if match is None:
            raise ValueError(f"fill_circles_edit: prompt {prompt!r} is not \"make the circle <colour>\"")
        name = match["colour"].replace(" ", "")
        try:
            ImageColor.getrgb(name)
        except ValueError:
            raise ValueError(f"fill_circles_edit: prompt {prompt!r} names no PIL colour ({name!r})") from None
        return name


METRICS: dict[str, ControlMetric] = {
    "fill_circles": FillCirclesIoU(), "canny": CannyEdgeF1(), "fill_circles_edit": FillCirclesEdit()}


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each named value, ignoring NaNs (a value no pair could score is NaN)."""
    names = sorted({name for score in scores for name in score})
    means = {}
    for name in names:
        values = np.array([s.get(name, np.nan) for s in scores], dtype=np.float64)
        means[name] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
    return means
