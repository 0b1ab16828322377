"""Geometry and scaling for image pairs, in PIL and numpy (no torchvision).

As in diffusers' train_controlnet.py: resize the shorter side to the resolution
(bilinear; with aspect buckets, until the image covers its bucket), crop a square (or
the bucket), the target scaled to [-1, 1] and the conditioning image,
with the very same geometry, kept in [0, 1].
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


def resize_to_cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale (keeping the aspect ratio) until the image covers width x height: for a
    square size, the shorter side becomes that size."""
    new_size = cover_size(image.size, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, Image.Resampling.BILINEAR)


def cover_size(original: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) resize_to_cover gives an image of `original` size."""
    width, height = original
    scale = max(size[0] / width, size[1] / height)
    return max(size[0], round(width * scale)), max(size[1], round(height * scale))


def centre_geometry(original: tuple[int, int], size: tuple[int, int], flip: bool) -> torch.Tensor:
    """The geometry of a centre crop to `size` (width, height), from the sizes alone (no
    image is decoded or resized): what a latent cache stores for each flip side."""
    resized = cover_size(original, size)
    return geometry(original, resized, crop_box(resized, size, True, None), flip)


def crop_box(
    size: tuple[int, int], crop: tuple[int, int], center: bool, rng: random.Random | None
) -> tuple[int, int, int, int]:
    (width, height), (crop_w, crop_h) = size, crop
    if center or rng is None:
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
    else:
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    return left, top, left + crop_w, top + crop_h


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def paired_transform(
    image: Image.Image,
    conditioning: Image.Image | None,
    size: int | tuple[int, int],
    center_crop: bool,
    flip: bool,
    rng: random.Random | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Target in [-1, 1] and conditioning in [0, 1], resized to cover `size` (a square
    resolution, or a bucket's (width, height)), cropped to it (at the centre, or where
    rng says) and flipped alike; and the sample's geometry (see `geometry`)."""
    size = (size, size) if isinstance(size, int) else size
    original = image.size
    image = resize_to_cover(image, size)
    box = crop_box(image.size, size, center_crop, rng)
    pixels = _finish(image, box, flip) * 2.0 - 1.0
    where = geometry(original, image.size, box, flip)
    if conditioning is None:
        return pixels, None, where
    # The conditioning image is brought to the target's size first, so one box fits both.
    conditioning = conditioning.resize(image.size, Image.Resampling.BILINEAR)
    return pixels, _finish(conditioning, box, flip), where


def geometry(original: tuple[int, int], resized: tuple[int, int], box: tuple[int, int, int, int],
             flip: bool) -> torch.Tensor:
    """(original height, original width, crop top, crop left, target height, target
    width): what SDXL conditions on (Podell et al. 2023, section 2.2), in its order. The
    crop is where the target sits in the resized image; flipped, the mirrored offset."""
    left, top, right, bottom = box
    if flip:
        left = resized[0] - right
    return torch.tensor([original[1], original[0], top, left, bottom - top, right - box[0]], dtype=torch.long)


def _finish(image: Image.Image, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
    image = image.crop(box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
