"""Training samples with reproducible order and randomness.

The sampler yields (epoch, index) pairs from a permutation seeded by (seed, epoch), and
every random choice a sample makes (crop, flip, caption, empty prompt) comes from a
generator seeded by (seed, epoch, index). So a resumed run sees the same batches, in
the same order, with the same augmentations, as one that never stopped.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from difftune.config import DataConfig
from difftune.data import edit_samples
from difftune.data.sources import Columns, DataError, open_image, reference_cells
from difftune.data.transforms import paired_transform


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{index}")


def draw_caption(value: Any, rng: random.Random, empty_proportion: float, where: str) -> str:
    """A sample's caption: one of a list drawn with the sample's generator, then "" with
    probability empty_proportion (caption dropout). `where` names the cell in errors."""
    if isinstance(value, bytes):  # a webdataset .txt member
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, (list, tuple)):
        if not value:
            raise DataError(f"{where}: empty caption list")
        value = rng.choice(list(value))
    if not isinstance(value, str):
        raise DataError(f"{where}: caption must be text, got {type(value).__name__}")
    return "" if rng.random() < empty_proportion else value


class EpochSampler(Sampler[tuple[int, int]]):
    """A seeded permutation per epoch that can start part-way through (for resume).

    The permutation is padded with its own head to a multiple of the global batch, so
    every process gets whole batches and accelerate never pads on its own (its padding
    depends on where iteration started, which would make a resumed epoch differ).
    """

    def __init__(self, size: int, seed: int, multiple: int = 1) -> None:
        self.size = size
        self.seed = seed
        self.padded = math.ceil(size / multiple) * multiple
        self.epoch = 0
        self.skip = 0

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        # Not named set_epoch: accelerate's DataLoaderShard calls set_epoch with its own
        # iteration count, which would override the resumed position.
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        order = (order * math.ceil(self.padded / self.size))[: self.padded]
        for index in order[self.skip :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return self.padded - self.skip


@dataclass(frozen=True)
class SamplePlan:
    row: int
    """The row's number in the dataset."""
    flip: bool
    caption: str
    rng: random.Random
    """The sample's generator, for the choices left (a random crop)."""


class TrainingSamples(Dataset):
    """Rows of a `datasets.Dataset` turned into tensors and a caption."""

    def __init__(
        self,
        rows: datasets.Dataset,
        columns: Columns,
        config: DataConfig,
        seed: int,
        fixed_caption: str | None = None,
        row_numbers: list[int] | None = None,
        sizes: list[tuple[int, int]] | None = None,
    ) -> None:
        self.rows = rows
        self.columns = columns
        self.config = config
        self.seed = seed
        self.root = Path(config.path)
        self.fixed_caption = fixed_caption
        self.row_numbers = row_numbers if row_numbers is not None else list(range(len(rows)))
        """The dataset rows trained on (bad ones skipped, max_samples applied), by number."""
        self.sizes = sizes
        """Each sample's (width, height) bucket; None: all data.resolution squares."""
        self.report: Any = None
        """The data check of these rows (a DataReport), when open_training_data made them."""
        self.reference_size: Any = None
        """An edit's (reference (w, h), target (w, h)) -> the reference's (w, h): the
        family's EditCapability.reference_size (None: the target's size)."""

    def __len__(self) -> int:
        return len(self.row_numbers)

    def plan(self, epoch: int, index: int) -> SamplePlan:
        """This sample's random choices, made without decoding an image (a cache of
        encoded images needs them too): flip, then caption, then (later) the crop."""
        rng = sample_rng(self.seed, epoch, index)
        flip = self.config.random_flip and rng.random() < 0.5
        caption = self._caption(index, rng)
        return SamplePlan(self.row_numbers[index], flip, caption, rng)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        plan = self.plan(epoch, index)
        if self.columns.references:
            return self._edit_sample(epoch, index, plan)
        image, conditioning = self.images(plan.row, index)
        pixels, conditioning_pixels, geometry = paired_transform(
            image, conditioning, self.size_of(index), self.config.center_crop, plan.flip, plan.rng
        )
        # The key seeds this sample's noise in the training step (see training/step.py).
        sample = {"pixels": pixels, "caption": plan.caption, "key": (epoch, index, 0), "geometry": geometry}
        if conditioning_pixels is not None:
            sample["conditioning_pixels"] = conditioning_pixels
        return sample

    def _edit_sample(self, epoch: int, index: int, plan: SamplePlan) -> dict[str, Any]:
        """An edit's target and its references (`references`, pixels in [0, 1]), sized,
        cropped and flipped as edit_samples.edit_pixels says (a stream's rows alike)."""
        row = self.rows[plan.row]
        image = open_image(row[self.columns.image], self.root, self._where(index, self.columns.image))
        references = self.references(plan.row, index)
        pixels, encoded, geometry = edit_samples.edit_pixels(image, references, self.size_of(index),
                                                             self.config.center_crop, plan.flip, plan.rng,
                                                             self.reference_size)
        return {"pixels": pixels, "caption": plan.caption, "key": (epoch, index, 0), "geometry": geometry,
                "references": encoded}

    def own_size(self, reference: tuple[int, int], size: tuple[int, int]) -> tuple[int, int] | None:
        """The size a reference is encoded at when it is not its target's (None: the target's,
        cropped with it)."""
        return edit_samples.own_size(self.reference_size, reference, size)

    def sized_reference(self, reference: Image.Image, size: tuple[int, int], flip: bool) -> torch.Tensor:
        """A reference encoded at a size of its own, as edit_samples.sized_reference makes it."""
        return edit_samples.sized_reference(self.reference_size, reference, size, flip)

    def reference_counts(self) -> list[int]:
        """How many references each sample's row has (an edit's; read without decoding)."""
        column = self.columns.conditioning
        cells = self.rows.select_columns([column]).with_format("python")[column]
        return [len(reference_cells(cells[row])) for row in self.row_numbers]

    def references(self, row_number: int, index: int) -> list[Image.Image]:
        """An edit row's reference images, as RGB (none: the row trains as text-to-image)."""
        column = self.columns.conditioning
        assert column is not None
        return edit_samples.open_references(self.rows[row_number][column], self.root, self._where(index, column))

    def size_of(self, index: int) -> tuple[int, int]:
        """(width, height) the sample trains at."""
        if self.sizes is not None:
            return self.sizes[index]
        return (self.config.resolution, self.config.resolution)

    def images(self, row_number: int, index: int) -> tuple[Image.Image, Image.Image | None]:
        """The row's target and conditioning image (None without one), as RGB."""
        row = self.rows[row_number]
        image = open_image(row[self.columns.image], self.root, self._where(index, self.columns.image))
        conditioning = None
        if self.columns.references:  # an edit's one reference (the latent cache holds that case only)
            references = self.references(row_number, index)
            return image, references[0] if len(references) == 1 else None
        if self.columns.conditioning is not None:
            where = self._where(index, self.columns.conditioning)
            conditioning = open_image(row[self.columns.conditioning], self.root, where)
        return image, conditioning

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples)

    def _caption(self, index: int, rng: random.Random) -> str:
        if self.columns.caption is None:
            return draw_caption(self.fixed_caption or "", rng, self.config.proportion_empty_prompts, "")
        return draw_caption(self._captions[self.row_numbers[index]], rng, self.config.proportion_empty_prompts,
                            self._where(index, self.columns.caption))

    @functools.cached_property
    def _captions(self) -> list[Any]:
        """The caption column as a list, read once (not with every row's image bytes;
        indexing `datasets`' lazy column costs ~0.5 ms a time)."""
        return list(self.rows[self.columns.caption])

    def caption_options(self, index: int | None = None) -> set[str]:
        """Every caption a sample can draw (that of sample `index`, or of any), and "" (caption
        dropout: always where any sample is meant, for the cache's single "" entry), for a
        text cache."""
        dropout = {""} if index is None or self.config.proportion_empty_prompts > 0 else set()
        if self.columns.caption is None:
            return {self.fixed_caption or ""} | dropout
        options = set(dropout)
        for row in self.row_numbers if index is None else [self.row_numbers[index]]:
            caption = self._captions[row]
            options.update(caption if isinstance(caption, (list, tuple)) else [caption])
        return {c for c in options if isinstance(c, str)}

    def unaugmented_references(self, index: int) -> list[torch.Tensor]:
        """Sample `index`'s references as its steps see them unflipped and centre-cropped (a
        text cache of instructions encoded with them)."""
        plan = SamplePlan(self.row_numbers[index], False, "", random.Random(0))
        return self._edit_sample(0, index, plan)["references"]

    def _where(self, index: int, column: str) -> str:
        return f"{self.config.path}, row {self.row_numbers[index]}, column {column!r}"


class PriorPreservationSamples(Dataset):
    """DreamBooth pairs: each index gives an instance sample and a class sample; an
    epoch is as long as the larger set, the smaller one repeating (as in diffusers).

    The class half is a view indexed by pair: pair i takes class image i mod (number of
    class images) at the size of its instance (its aspect bucket, with data.buckets), so
    instance and class samples stack into one batch. A class image is square (the base
    drew it at data.resolution); in a bucket it is scaled to cover it and cropped.
    Build with `pair`.
    """

    CLASS_ROLE = 1

    def __init__(self, instances: Any, paired_classes: Any) -> None:
        self.instances = instances
        self.classes = paired_classes
        self.sizes = paired_classes.sizes
        """The pair's bucket (its instance's), for the batch sampler."""
        self.report = instances.report

    @classmethod
    def pair(cls, instances: TrainingSamples, classes: TrainingSamples) -> PriorPreservationSamples:
        length = max(len(instances), len(classes))
        sizes = None if instances.sizes is None else [instances.sizes[i % len(instances)] for i in range(length)]
        paired_classes = TrainingSamples(
            classes.rows, classes.columns, classes.config, classes.seed, classes.fixed_caption,
            row_numbers=[classes.row_numbers[i % len(classes)] for i in range(length)], sizes=sizes,
        )
        paired_classes.report = classes.report
        return cls(instances, paired_classes)

    def map(self, encode: Any) -> PriorPreservationSamples:
        """The same pairs with each half replaced by encode(half) (a cached view)."""
        return PriorPreservationSamples(encode(self.instances), encode(self.classes))

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        instance = self.instances[(epoch, index % len(self.instances))]
        prior = self.classes[(epoch, index)]
        instance["key"] = (epoch, index, 0)
        prior["key"] = (epoch, index, self.CLASS_ROLE)
        return {"instance": instance, "class": prior}

    @staticmethod
    def collate(pairs: list[dict[str, Any]]) -> dict[str, Any]:
        """Instances first, then their class samples; `prior` marks the second half."""
        batch = collate([p["instance"] for p in pairs] + [p["class"] for p in pairs])
        batch["prior"] = torch.tensor([False] * len(pairs) + [True] * len(pairs))
        return batch


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Tensors stacked by name; "text" (a family's named conditioning, from a text
    cache) stacked name by name, whatever the names are (`stack_padded`)."""
    batch: dict[str, Any] = {"captions": [s["caption"] for s in samples], "keys": [s["key"] for s in samples]}
    if "references" in samples[0]:  # an edit: one reference each, of one size, stacks as a conditioning image
        shapes = {tuple(tuple(r.shape) for r in s["references"]) for s in samples}
        if len(shapes) == 1 and len(samples[0]["references"]) == 1:
            batch["conditioning_pixels"] = torch.stack([s["references"][0] for s in samples]).contiguous()
        else:
            batch["references"] = [s["references"] for s in samples]
    for key in ("pixels", "conditioning_pixels", "conditioning_latent_mean", "latent_mean", "latent_std", "geometry"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples]).contiguous()
    if "text" in samples[0]:
        batch["text"] = {name: stack_padded([s["text"][name] for s in samples]) for name in samples[0]["text"]}
    return batch


def stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors stacked, those shorter in their first dimension zero-padded to the longest: a
    family that pads each batch's prompts to its longest (Qwen-Image) caches every prompt
    unpadded, and its mask's zeros mark the padding as its encoder's batches do."""
    longest = max(tensor.shape[0] for tensor in tensors)
    if all(tensor.shape[0] == longest for tensor in tensors):
        return torch.stack(tensors).contiguous()
    return torch.stack([torch.cat([tensor, tensor.new_zeros(longest - tensor.shape[0], *tensor.shape[1:])])
                        for tensor in tensors]).contiguous()
