"""Geometry and scaling for image pairs, in PIL and numpy (no torchvision).

As in diffusers' train_controlnet.py: resize the shorter side to the resolution
(bilinear), crop a square, the target scaled to [-1, 1] and the conditioning image,
with the very same geometry, kept in [0, 1].
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BILINEAR)


def crop_box(size: tuple[int, int], crop: int, center: bool, rng: random.Random) -> tuple[int, int, int, int]:
    width, height = size
    if center:
        left, top = (width - crop) // 2, (height - crop) // 2
    else:
        left, top = rng.randint(0, width - crop), rng.randint(0, height - crop)
    return left, top, left + crop, top + crop


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def paired_transform(
    image: Image.Image,
    conditioning: Image.Image | None,
    resolution: int,
    center_crop: bool,
    flip: bool,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target in [-1, 1] and conditioning in [0, 1], cropped (at the centre, or where rng
    says) and flipped alike."""
    image = resize_shorter_side(image, resolution)
    box = crop_box(image.size, resolution, center_crop, rng)
    pixels = _finish(image, box, flip) * 2.0 - 1.0
    if conditioning is None:
        return pixels, None
    # The conditioning image is brought to the target's size first, so one box fits both.
    conditioning = conditioning.resize(image.size, Image.Resampling.BILINEAR)
    return pixels, _finish(conditioning, box, flip)


def _finish(image: Image.Image, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
    image = image.crop(box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
