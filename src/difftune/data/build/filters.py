"""The filters of `difftune data prepare`: every image is measured once (on a worker
process), then each filter decides on the measures, in this order, the first that
drops a file naming why:

  unreadable     PIL cannot decode the whole file (truncated, not an image, missing);
                 the same for its conditioning image, when it has one
  too_small      the short side is under min_size pixels
  aspect         the long side over the short is more than max_aspect
  low_bytes      lossy files (JPEG, WebP) under min_bytes_per_megapixel: heavy compression
  blurry         the variance of the Laplacian (grey, long side at most 512 px) is under
                 min_sharpness (Pech-Pacheco et al. 2000)
  duplicate      the same pixels as an earlier file (SHA-256 of the decoded RGB)
  near_duplicate the same perceptual hash within phash_distance bits (imagehash's pHash)
                 and the same colours (8x8 thumbnails within 2 levels on average): pHash
                 sees structure only, and would call two plain images of different
                 colours the same

Of a group of duplicates the original is kept: a name that does not look like a copy
("photo (1).jpg", "photo-copy.png", "dup_photo.png") before one that does, then the
oldest file (modification time), then the first name.
low_bytes and blurry are off by default (0): flat synthetic images are small and have
no edges, and would all be dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from difftune.data.build.inputs import Item
from difftune.data.images import to_rgb
from difftune.data.sources import regular_file_problem

LOSSY_FORMATS = frozenset({"JPEG", "WEBP", "MPO"})
SHARPNESS_SIDE = 512
COLOUR_TOLERANCE = 2.0
"""Mean absolute difference (0-255) of two 8x8 colour thumbnails still called the same."""


@dataclass(frozen=True)
class FilterSettings:
    min_size: int = 32
    max_aspect: float = 4.0
    min_bytes_per_megapixel: float = 0.0
    min_sharpness: float = 0.0
    dedup: bool = True
    phash_distance: int = 4
    """Bits two pHashes (64 bits) may differ by and still be near duplicates; -1 turns
    near-duplicate detection off (exact duplicates are still dropped with dedup)."""


@dataclass
class Measures:
    """What the filters look at, measured once per input (and kept in the journal)."""

    problem: str | None = None
    width: int = 0
    height: int = 0
    format: str = ""
    bytes: int = 0
    modified: int = 0
    sharpness: float = 0.0
    pixels: str = ""
    phash: str = ""
    thumbnail: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(item: Item) -> Measures:
    """Decode the image whole (a truncated file fails here) and its conditioning image."""
    with truncated_files_fail():
        return _measure(item)


@contextmanager
def truncated_files_fail() -> Iterator[None]:
    """PIL's LOAD_TRUNCATED_IMAGES off while measuring: some libraries turn it on at
    import, and a truncated file would then decode as grey and pass."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _measure(item: Item) -> Measures:
    import imagehash

    image, image_format = decode_whole(item.file)
    if isinstance(image, str):
        return Measures(problem=image)
    if item.conditioning is not None:
        conditioning, _ = decode_whole(item.conditioning)
        if not isinstance(conditioning, str) and conditioning.size != image.size:
            conditioning = f"{conditioning.width}x{conditioning.height}, the image is {image.width}x{image.height}"
        if isinstance(conditioning, str):
            return Measures(problem=f"conditioning image {item.conditioning.name}: {conditioning}")
    pixels = np.asarray(image)
    digest = hashlib.sha256(f"{image.size}".encode() + pixels.tobytes()).hexdigest()
    thumbnail = np.asarray(image.resize((8, 8), Image.Resampling.BOX), dtype=np.uint8).reshape(-1).tolist()
    status = item.file.stat()
    return Measures(width=image.width, height=image.height, format=image_format, bytes=status.st_size,
                    modified=status.st_mtime_ns,
                    sharpness=sharpness(image), pixels=digest, phash=str(imagehash.phash(image)),
                    thumbnail=thumbnail)


def decode_whole(path: Path) -> tuple[Image.Image | str, str]:
    """(the image as training reads it, its format), every byte decoded (a truncated file
    fails here, where sources.image_problem reads the header only); or (why not, "")."""
    problem = regular_file_problem(path)
    if problem:
        return problem, ""
    try:
        with Image.open(path) as opened:
            opened.load()
            return to_rgb(opened), opened.format or ""
    except Exception as error:  # noqa: BLE001 (PIL raises many kinds for a bad file)
        return f"{type(error).__name__}: {error}", ""


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian of the grey image, its long side brought to at most
    512 px first (so the figure does not grow with resolution, and stays fast)."""
    import cv2

    grey = image.convert("L")
    scale = SHARPNESS_SIDE / max(grey.size)
    if scale < 1:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))),
                           Image.Resampling.BOX)
    return float(cv2.Laplacian(np.asarray(grey), cv2.CV_64F).var())


def single_file_reason(m: Measures, settings: FilterSettings) -> tuple[str, str] | None:
    """(reason, detail) for the first single-file filter that drops it, or None."""
    if m.problem is not None:
        return "unreadable", m.problem
    short, long = min(m.width, m.height), max(m.width, m.height)
    if short < settings.min_size:
        return "too_small", f"{m.width}x{m.height}, the short side under min_size {settings.min_size}"
    if long / short > settings.max_aspect:
        return "aspect", f"{m.width}x{m.height}, aspect {long / short:.2f} over max_aspect {settings.max_aspect}"
    per_megapixel = m.bytes / (m.width * m.height / 1e6)
    if m.format in LOSSY_FORMATS and per_megapixel < settings.min_bytes_per_megapixel:
        return "low_bytes", (f"{m.format}, {per_megapixel:.0f} bytes per megapixel, under "
                             f"min_bytes_per_megapixel {settings.min_bytes_per_megapixel:.0f}")
    if m.sharpness < settings.min_sharpness:
        return "blurry", f"sharpness {m.sharpness:.1f} under min_sharpness {settings.min_sharpness}"
    return None


def duplicate_reasons(names: list[str], measures: list[Measures],
                      settings: FilterSettings) -> dict[int, tuple[str, str]]:
    """Among the files still kept, index -> (reason, detail) for each duplicate of an
    earlier one."""
    if not settings.dedup:
        return {}
    order = sorted(range(len(names)), key=lambda i: (looks_like_a_copy(names[i]), measures[i].modified, names[i]))
    drops: dict[int, tuple[str, str]] = {}
    first_with: dict[str, int] = {}
    for index in order:
        earlier = first_with.setdefault(measures[index].pixels, index)
        if earlier != index:
            drops[index] = ("duplicate", f"the same pixels as {names[earlier]}")
    if settings.phash_distance < 0:
        return drops
    kept = [i for i in order if i not in drops]
    for index, (earlier, distance) in _near_pairs(kept, measures, settings.phash_distance).items():
        drops[index] = ("near_duplicate", f"perceptual hash {distance} bit(s) from {names[earlier]}, the same colours")
    return drops


COPY_NAME = re.compile(r"(\bcopy\b|[-_ ]copy|copy[-_ ]|\(\d+\)$|[-_ ]dup(licate)?\b|^dup(licate)?([-_ ]|\d*$))",
                       re.IGNORECASE)


def looks_like_a_copy(name: str) -> bool:
    """Named as file managers and people name copies."""
    return bool(COPY_NAME.search(Path(name).stem))


def _near_pairs(kept: list[int], measures: list[Measures], distance: int) -> dict[int, tuple[int, int]]:
    """index -> (the earlier kept file it is near, bits apart). Candidates share one of
    distance + 1 bands of the 64-bit hash exactly (two hashes within `distance` bits
    must: pigeonhole), so the search is not quadratic in the number of files."""
    bands = distance + 1
    widths = [64 // bands + (1 if b < 64 % bands else 0) for b in range(bands)]
    bits = {i: int(measures[i].phash, 16) for i in kept}
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    found: dict[int, tuple[int, int]] = {}
    for index in kept:
        value, keys, shift = bits[index], [], 0
        for band, width in enumerate(widths):
            keys.append((band, (value >> shift) & ((1 << width) - 1)))
            shift += width
        candidates = sorted({c for key in keys for c in buckets[key]})
        for earlier in candidates:
            apart = (value ^ bits[earlier]).bit_count()
            if apart <= distance and _same_colours(measures[index], measures[earlier]):
                found[index] = (earlier, apart)
                break
        if index not in found:  # only kept files stand for their group
            for key in keys:
                buckets[key].append(index)
    return found


def _same_colours(a: Measures, b: Measures) -> bool:
    difference = np.abs(np.asarray(a.thumbnail, dtype=np.float32) - np.asarray(b.thumbnail, dtype=np.float32))
    return float(difference.mean()) <= COLOUR_TOLERANCE
