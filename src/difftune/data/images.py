"""One way to read an image, everywhere: upright, as every viewer shows it.

A phone stores a portrait photo's pixels sideways and says how to turn them in the EXIF
orientation tag (1-8). Training applies it (`to_rgb`, as diffusers' DreamBooth does), so
everything that looks at an image's pixels or size must apply it too: `prepare`'s
measures, `condition`'s input, the data check's sizes and the aspect-ratio buckets.
Otherwise a conditioning image drawn for the upright photo is called a size mismatch, or
the photo lands in a landscape bucket.

- `open_oriented(source)`: the pixels, 8-bit RGB, upright.
- `oriented_size(image)`: the upright (width, height) of an opened image from its
  header, without decoding the pixels (orientations 5-8 swap width and height).
- `upright(image)`: the image turned, its mode kept (for writers that re-encode).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112
SWAPS_SIDES = frozenset({5, 6, 7, 8})
"""Orientations that turn the image a quarter (transpose, 90, transverse, 270 degrees)."""
TIFF_WIDTH, TIFF_HEIGHT = 256, 257


def open_oriented(source: Path | IO[bytes]) -> Image.Image:
    """The whole image decoded, as 8-bit RGB, upright."""
    with Image.open(source) as image:
        return to_rgb(image)


def upright(image: Image.Image) -> Image.Image:
    """The image with its EXIF orientation applied (and the tag removed), mode kept."""
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, upright. EXIF orientation is applied (as diffusers' DreamBooth does), so
    a phone photo trains the way it displays; 16- and 32-bit images are rescaled to 8 bits
    (PIL's own convert would clip everything above 255 to white)."""
    image = upright(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            array = array / 257.0  # the 16-bit range onto 8 bits, whatever this image's brightest pixel
        elif image.mode == "I" and array.max(initial=0.0) > 255:
            array = array / 257.0  # 32-bit integers holding 16-bit values (PIL's older 16-bit PNGs)
        elif image.mode == "F" and array.max(initial=0.0) <= 1.0:
            array = array * 255.0  # float images in [0, 1]
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as `upright` will make it, read from the header."""
    turn = orientation(image)
    width, height = image.size
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None and ORIENTATION in tags:
        # PIL's TIFF reader reports the turned size before it turns the pixels (at load,
        # when it drops the tag); the stored sides are in the tags.
        width, height = tags.get(TIFF_WIDTH, width), tags.get(TIFF_HEIGHT, height)
    return (height, width) if turn in SWAPS_SIDES else (width, height)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation exif_transpose will apply (1: none). PIL's PNG reader decodes
    the whole image to look for EXIF it has not met yet (an eXIf chunk may follow the
    pixels); here the chunks after the pixels are walked instead, nothing decoded."""
    if image.format == "PNG" and image.tile and "exif" not in image.info:
        return _png_orientation(image)
    return int(image.getexif().get(ORIENTATION, 1))


def _png_orientation(image: Image.Image) -> int:
    # A blank image with the PNG's header info and any trailing eXIf: PIL's own getexif
    # then reads it exactly as it will after decoding (eXIf, "Raw profile type exif",
    # XMP), and the PNG's cached EXIF is left alone.
    probe = Image.new("1", (1, 1))
    probe.info = dict(image.info)
    trailing = _trailing_exif(image)
    if trailing is not None:
        probe.info["exif"] = b"Exif\x00\x00" + trailing
    return int(probe.getexif().get(ORIENTATION, 1))


def _trailing_exif(image: Image.Image) -> bytes | None:
    """The eXIf chunk after the first image data chunk, by chunk headers and seeks."""
    handle = image.fp
    if handle is None:
        return None
    where = handle.tell()
    try:
        handle.seek(image.tile[0][2] - 8)  # the first IDAT's length and type
        while True:
            header = handle.read(8)
            if len(header) < 8:
                return None
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND":
                return None
            if kind == b"eXIf":
                data = handle.read(length)
                return data if len(data) == length else None
            handle.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    finally:
        handle.seek(where)
