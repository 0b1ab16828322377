"""Aspect-ratio buckets: train each image near its own shape instead of a square crop.

Buckets are (width, height) pairs, multiples of `step`, about `resolution` squared in
area (never more), with an aspect ratio of at most `max_aspect`. Each image goes to the
bucket nearest its own aspect ratio (with no_upscale, among those it covers), is scaled
to cover it and cropped to it. Every batch comes from one bucket.

The batch order is a pure function of (seed, epoch): within each bucket a seeded
permutation, padded with its own head to whole batches, then the batches of all buckets
in a seeded order, padded to a multiple of the number of processes. So a resumed epoch
skips whole batches and sees the very same ones, as with EpochSampler.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Sampler

from difftune.data.images import oriented_size
from difftune.data.sources import DataError, image_source


def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """The largest (width, height) per width, within the area and aspect limits."""
    area = resolution * resolution
    sizes = set()
    width = step
    while width <= area // step:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.add((width, height))
        width += step
    return sorted(sizes)


def assign_bucket(
    image_size: tuple[int, int], sizes: list[tuple[int, int]], no_upscale: bool, step: int
) -> tuple[int, int]:
    """The bucket nearest the image's aspect ratio (log scale). With no_upscale, only
    buckets the image covers; an image smaller than all of them gets a bucket of its own
    size (rounded down to the step), so it is never enlarged."""
    width, height = image_size
    candidates = sizes
    if no_upscale:
        candidates = [s for s in sizes if s[0] <= width and s[1] <= height]
        if not candidates:
            return (max(step, width // step * step), max(step, height // step * step))
    aspect = math.log(width / height)
    return min(candidates, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def image_size(value: Any, root: Path, where: str) -> tuple[int, int]:
    """Width and height as training sees them (EXIF orientation applied), from the file's
    header (nothing decoded): a phone's portrait photo goes to a portrait bucket."""
    source = image_source(value, root)
    if source is None:
        raise DataError(f"{where}: expected an image, bytes or a path")
    try:
        with Image.open(source) as image:
            return oriented_size(image)
    except Exception as error:  # PIL raises many types for a bad file
        raise DataError(f"{where}: unreadable image ({type(error).__name__}: {error})") from None


class BucketBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index), each from one bucket; resumable by whole batches."""

    def __init__(self, buckets: list[tuple[int, int]], seed: int, batch_size: int, num_processes: int) -> None:
        self.buckets = buckets  # the bucket of each sample
        self.seed = seed
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.drop_last = False
        self.epoch = 0
        self.skip = 0
        self.padded = len(self._batches(0)) * batch_size
        """Samples an epoch holds, padding included (the loop counts epochs in these)."""

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        """`skip` counts samples of all processes, as the loop does; whole batches."""
        self.epoch, self.skip = epoch, skip

    def _batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        members: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            members.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(members):
            indices = members[bucket]
            order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            whole = math.ceil(len(order) / self.batch_size) * self.batch_size
            order = (order * math.ceil(whole / len(order)))[:whole]
            batches += [order[i : i + self.batch_size] for i in range(0, whole, self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        steps = math.ceil(len(batches) / self.num_processes) * self.num_processes
        return (batches * math.ceil(steps / len(batches)))[:steps]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self._batches(self.epoch)[self.skip // self.batch_size :]:
            yield [(self.epoch, index) for index in batch]

    def __len__(self) -> int:
        return len(self._batches(self.epoch)) - self.skip // self.batch_size

    def summary(self) -> dict[str, int]:
        """Samples per bucket, "WxH": count, for the run's events."""
        return {f"{w}x{h}": n for (w, h), n in sorted(Counter(self.buckets).items())}
