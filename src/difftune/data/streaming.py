"""Streaming data (data.streaming = true): rows read as they arrive from the Hub, from
webdataset tar shards or from local files, never downloaded or scanned whole.

- Each process reads its own share of the stream (datasets' split_dataset_by_node: whole
  shards when they divide among the processes, else every n-th row).
- An epoch is data.max_samples samples (required: a stream's length is unknown, and the
  step count and schedule need one), padded to the global batch; each process reads its
  share of them, shuffled within data.shuffle_buffer rows by a seed of (seed, epoch). A
  stream shorter than that starts over.
- The position is the loop's: samples consumed this epoch by all processes. A resumed
  run reads its share of them again (checking each row, so that a row skipped as bad
  is passed over again and the resumed run stays on the same rows) and goes on with the rows it would have read next, with
  the same flips, captions and noise (seeded by the sample's place in the epoch).
- Columns are checked on the first row before any model loads (data.stream_checks). A
  webdataset sample lacking a member there is that sample's fault when a later one has
  it (named by its shard and key, or skipped with data.on_bad = "skip"); when none of the
  next LOOKAHEAD has it, the column is misnamed, and said to be. A row that cannot be
  trained on later stops the run naming its place in the stream (and a webdataset row's
  shard and member), or with data.on_bad = "skip" is passed over (the next row takes its
  place) and logged; so is what is left of a damaged shard (data.shards).
  The loop saves a checkpoint of its last finished step before it stops.
- An edit's row (method kind "edit") carries its references as a row read whole does
  (none, one or a list: data.edit_samples makes both), so the method sees the same batch;
  a row with more than the family's edit pipeline takes is a bad row like any other.
- A share of the stream with no row that can be trained on stops the run, rather than
  reading it again forever; so does a stream datasets cannot read on (a damaged
  parquet file, a lost connection), named, whatever data.on_bad says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
from torch.utils.data import IterableDataset

from difftune.config import DataConfig
from difftune.data.edit_samples import ReferenceSize, edit_pixels, open_references
from difftune.data.samples import collate, draw_caption, sample_rng
from difftune.data.shards import KEY, PROBLEM, SHARD, list_shards, reference_cell, stream_of_shards
from difftune.data.sources import (
    Columns,
    DataError,
    ReferenceLimit,
    explain_load_failure,
    open_image,
    undecoded_feature,
)
from difftune.data.transforms import paired_transform

logger = logging.getLogger(__name__)

SKIPPING = 'skipping (data.on_bad = "skip"): %s'


def open_stream(config: DataConfig) -> datasets.IterableDataset:
    """The split as a stream: a folder of webdataset shards (data.shards), or anything
    load_dataset streams (a Hub dataset, parquet, an imagefolder)."""
    path = Path(config.path)
    try:
        shards = list_shards(path) if path.is_dir() else []
        if shards:
            return stream_of_shards(shards)
        return datasets.load_dataset(config.path, config.config_name, split=config.split, streaming=True,
                                     cache_dir=config.cache_dir)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 (datasets raises many kinds; each is explained)
        raise DataError(f"data.path {config.path!r}: {explain_load_failure(path, error)}") from None


def no_member(row: dict[str, Any], field: str, place: str) -> str:
    """A webdataset sample without the member a column names, and the members it has."""
    members = ", ".join(f"{row[KEY]}.{name}" for name, value in row.items()
                        if not name.startswith("__") and value is not None)
    return f"{row[SHARD]}, sample {row[KEY]} ({place}): no member {row[KEY]}.{field} (its members: {members or 'none'})"


def named_failures(stream: Iterable[dict[str, Any]], path: str, where: Callable[[], str]) -> Iterator[dict[str, Any]]:
    """The stream's rows; a failure inside datasets (a damaged parquet file, a lost
    connection) becomes a DataError naming the stream and `where()` it broke, so the
    loop keeps the work done (a checkpoint) and the user reads a sentence. Rows can be
    passed over; a stream that cannot be read on cannot."""
    rows = iter(stream)
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except DataError:
                raise
            except Exception as error:  # noqa: BLE001 (datasets and its readers raise many kinds)
                raise DataError(f"data.path {path!r}: the stream cannot be read on {where()} "
                                f"({type(error).__name__}: {error}); data.on_bad = \"skip\" passes over rows, not a "
                                "stream that breaks") from None
            yield row
    finally:
        _close(rows)


def _close(rows: Iterator[Any]) -> None:
    """Close a stream left part-read here, not in the garbage collector: datasets' reader
    then shuts its thread pool down, and from the collector, in a thread being started,
    that deadlocks (a stopped run, or a test holding the error, hung)."""
    close = getattr(rows, "close", None)
    if close is not None:
        close()


def undecoded(stream: datasets.IterableDataset) -> datasets.IterableDataset:
    """The stream with its image columns left as bytes, so that a bad file is reported (or
    skipped) by difftune, naming its row, not raised from inside datasets."""
    for column, feature in (stream.features or {}).items():
        if (kept := undecoded_feature(feature)) is not None:
            stream = stream.cast_column(column, kept)
    return stream


def member_text(value: Any, field: str, where: str) -> Any:
    """A webdataset member's bytes as its text (JSON decoded for a .json member, as
    datasets' builder does); an undecodable one is named, never replaced."""
    if not isinstance(value, bytes):
        return value
    try:
        text = value.decode("utf-8")
        return json.loads(text) if field.rsplit(".", 1)[-1] in ("json", "jsn") else text
    except UnicodeDecodeError as error:
        raise DataError(f"{where}: not UTF-8 text ({error})") from None
    except ValueError as error:
        raise DataError(f"{where}: not JSON ({error})") from None


class StreamingSamples(IterableDataset):
    """The loop's samples and its sampler at once: `start_epoch(epoch, skip)` sets where
    the next iteration begins; each process yields its share, `padded` samples an epoch
    for all processes together."""

    def __init__(self, config: DataConfig, seed: int, columns: Columns, fixed_caption: str | None = None,
                 reference_limit: ReferenceLimit | None = None) -> None:
        self.config = config
        self.seed = seed
        self.columns = columns
        self.fixed_caption = fixed_caption
        self.root = Path(config.path)
        self.rank, self.processes, self.padded = 0, 1, int(config.max_samples or 0)
        self.epoch, self.skip = 0, 0
        self.skipped_rows = 0
        self._trained_this_pass = False  # a row of the current pass could be trained on
        self.report: Any = None  # no whole-data check: the stream is read once, as it trains
        self.sizes = None  # no aspect buckets (sizes are not known ahead)
        self.reference_limit = reference_limit
        """How many references an edit row may have (a row with more is bad: it stops the run,
        or is skipped)."""
        self.reference_size: ReferenceSize | None = None
        """An edit's reference size (set as on samples.TrainingSamples; None: the target's)."""

    def bind(self, rank: int, processes: int, global_batch: int) -> None:
        """This process's place in the launch; the epoch padded to the global batch."""
        self.rank, self.processes = rank, processes
        self.padded = math.ceil(int(self.config.max_samples or 0) / global_batch) * global_batch

    def __len__(self) -> int:
        return int(self.config.max_samples or 0)

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """This process's samples of the epoch from the resume point: its k-th is the
        epoch's sample k * processes + rank (what seeds its randomness and noise)."""
        share, start = self.padded // self.processes, self.skip // self.processes
        with contextlib.closing(self._rows()) as rows:  # an endless stream, left part-read (named_failures)
            for k in range(start):  # the rows a stopped run had consumed, bad ones passed over as it did
                self._good_row(rows, sample_rng(self.seed, self.epoch, k * self.processes + self.rank), replay=True)
            for k in range(start, share):
                index = k * self.processes + self.rank
                yield self._sample(rows, index)

    def _rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(place in this process's share, row), endlessly: the epoch's shuffled share,
        started over when it runs out."""
        from datasets.distributed import split_dataset_by_node

        stream = undecoded(open_stream(self.config))
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.processes)
        stream = stream.shuffle(seed=self.seed * 100_003 + self.epoch, buffer_size=self.config.shuffle_buffer)
        place, passes = 0, 0

        def where() -> str:
            return f"after {place} row(s) of process {self.rank}'s share in epoch {self.epoch}"

        while True:
            stream.set_epoch(passes)
            start, self._trained_this_pass = place, False
            for row in named_failures(stream, self.config.path, where):
                yield place, row
                place += 1
            if place == start:
                raise DataError(f"data.path {self.config.path!r}: process {self.rank} of {self.processes} got no rows "
                                "of the stream (fewer rows than processes?)")
            if not self._trained_this_pass:  # every row was passed over: another pass would be the same
                raise DataError(f"data.path {self.config.path!r}: no row of process {self.rank}'s share of the stream "
                                f"can be trained on (data.on_bad = \"skip\" passed over all {place - start}, each "
                                "logged)")
            passes += 1

    def _sample(self, rows: Iterator[tuple[int, dict[str, Any]]], index: int) -> dict[str, Any]:
        rng = sample_rng(self.seed, self.epoch, index)
        flip = self.config.random_flip and rng.random() < 0.5
        caption, image, conditioning = self._good_row(rows, rng)
        size = (self.config.resolution, self.config.resolution)
        if self.columns.references:  # made as a row read whole makes it: the same batch for the method
            pixels, references, geometry = edit_pixels(image, conditioning, size, self.config.center_crop, flip, rng,
                                                       self.reference_size)
            return {"pixels": pixels, "caption": caption, "key": (self.epoch, index, 0), "geometry": geometry,
                    "references": references}
        pixels, conditioning_pixels, geometry = paired_transform(image, conditioning, size, self.config.center_crop,
                                                                 flip, rng)
        sample = {"pixels": pixels, "caption": caption, "key": (self.epoch, index, 0), "geometry": geometry}
        if conditioning_pixels is not None:
            sample["conditioning_pixels"] = conditioning_pixels
        return sample

    def _good_row(self, rows: Iterator[tuple[int, dict[str, Any]]], rng: Any,
                  replay: bool = False) -> tuple[str, Any, Any]:
        """The next row that can be trained on: (caption, image, conditioning). A bad one
        stops the run, or with data.on_bad = "skip" is passed over (and counted, unless a
        resumed run is only replaying what its first part read)."""
        while True:
            place, row = next(rows)
            try:
                if row.get(PROBLEM):  # a damaged shard or sample (data.shards)
                    raise DataError(f"{row[PROBLEM]} ({self._place(place)})")
                caption = self._caption(row, rng, place)
                image, conditioning = self._images(row, place)
                self._trained_this_pass = True
                return caption, image, conditioning
            except DataError as problem:
                if self.config.on_bad == "error":
                    raise
                if not replay:
                    self.skipped_rows += 1
                    logger.warning(SKIPPING, problem)

    def _place(self, place: int) -> str:
        return f"row {place} of process {self.rank}'s share of the stream in epoch {self.epoch}"

    def _where(self, row: dict[str, Any], place: int, column: str) -> str:
        """The cell: a webdataset row's shard and member, else its place in the stream."""
        if row.get(SHARD):
            return f"{row[SHARD]}, member {row[KEY]}.{column} ({self._place(place)}, column {column!r})"
        return (f"{self.config.path}, row {place} of process {self.rank}'s share of the stream "
                f"(epoch {self.epoch}), column {column!r}")

    def _cell(self, row: dict[str, Any], place: int, column: str) -> Any:
        """The row's value in a column; a webdataset sample without that member is named."""
        value = row.get(column)
        if value is None and row.get(SHARD):
            raise DataError(no_member(row, column, self._place(place)))
        return value

    def _images(self, row: dict[str, Any], place: int) -> tuple[Any, Any]:
        column = self.columns.image
        image = open_image(self._cell(row, place, column), self.root, self._where(row, place, column))
        conditioning = None
        column = self.columns.conditioning
        if column is not None and self.columns.references:  # none (no member, an empty cell), one or several
            conditioning = open_references(reference_cell(row, column), self.root, self._where(row, place, column),
                                           self.reference_limit)
        elif column is not None:
            conditioning = open_image(self._cell(row, place, column), self.root, self._where(row, place, column))
        return image, conditioning

    def _caption(self, row: dict[str, Any], rng: Any, place: int) -> str:
        if self.columns.caption is None:
            return draw_caption(self.fixed_caption or "", rng, self.config.proportion_empty_prompts, "")
        column = self.columns.caption
        where = self._where(row, place, column)
        caption = member_text(self._cell(row, place, column), column, where)
        return draw_caption(caption, rng, self.config.proportion_empty_prompts, where)

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples)
