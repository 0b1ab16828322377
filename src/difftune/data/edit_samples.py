"""An edit sample's target and references as tensors, made by one function for data read
whole (samples.TrainingSamples) and a stream (streaming.StreamingSamples), so a streamed
row gives the method the very batch the same row read whole gives it.

Each reference is either at its target's size, cropped and flipped with the target (the
same box: FLUX.1 Kontext), or at a size of its own (the family's `reference_size`:
Qwen-Image-Edit's about a megapixel), resized whole as the family's edit pipeline resizes
it and flipped with its target.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from difftune.data.sources import DataError, ReferenceLimit, open_image, reference_cells
from difftune.data.transforms import paired_transform, to_tensor

OWN_SIZE_RESAMPLING = Image.Resampling.LANCZOS
"""How a reference encoded at a size of its own is resized: as diffusers' VaeImageProcessor
(resample "lanczos"), with which the edit pipelines that size references resize them."""

ReferenceSize = Callable[[tuple[int, int], tuple[int, int]], tuple[int, int]]
"""(reference (w, h), target (w, h)) -> the (w, h) the reference is encoded at: the family's
EditCapability.reference_size."""


def own_size(reference_size: ReferenceSize | None, reference: tuple[int, int],
             size: tuple[int, int]) -> tuple[int, int] | None:
    """The size a reference is encoded at when it is not its target's (None: the target's,
    cropped with it)."""
    wanted = tuple(reference_size(reference, size)) if reference_size else tuple(size)
    return None if wanted == tuple(size) else wanted  # type: ignore[return-value]


def sized_reference(reference_size: ReferenceSize | None, reference: Image.Image, size: tuple[int, int],
                    flip: bool) -> torch.Tensor:
    """A reference encoded at a size of its own (the family's edit pipeline's), resized
    whole as that pipeline resizes it (diffusers' VaeImageProcessor.resize: Lanczos; the
    Qwen-Image-Edit pipelines) and flipped with its target; pixels in [0, 1]."""
    wanted = own_size(reference_size, reference.size, size) or size
    resized = reference.resize(tuple(wanted), OWN_SIZE_RESAMPLING)
    return to_tensor(resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized)


def edit_pixels(image: Image.Image, references: list[Image.Image], size: tuple[int, int], center_crop: bool,
                flip: bool, rng: random.Random, reference_size: ReferenceSize | None
                ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The target in [-1, 1], its references in [0, 1] and its geometry. The generator is
    left as the target's crop leaves it, whatever the references (a row's later draws
    do not depend on how many it has)."""
    state = rng.getstate()  # each reference's crop is the target's
    pixels, _, geometry = paired_transform(image, None, size, center_crop, flip, rng)
    after = rng.getstate()
    encoded = []
    for reference in references:
        if own_size(reference_size, reference.size, size) is None:
            rng.setstate(state)
            encoded.append(paired_transform(image, reference, size, center_crop, flip, rng)[1])
        else:
            encoded.append(sized_reference(reference_size, reference, size, flip))
    rng.setstate(after)
    return pixels, encoded, geometry


def open_references(value: Any, root: Path, where: str, limit: ReferenceLimit | None = None) -> list[Image.Image]:
    """A row's reference images (`value`: its cell), as RGB: none (the row trains as
    text-to-image), one or several. `where` names the cell; a row with more than `limit`
    allows is refused naming it."""
    cells = reference_cells(value)
    problem = limit.problem(len(cells)) if limit is not None else None
    if problem:
        raise DataError(f"{where}: {problem}")
    return [open_image(cell, root, where + (f" [{number}]" if len(cells) > 1 else ""))
            for number, cell in enumerate(cells)]
