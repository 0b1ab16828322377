"""The checks of a stream (data.streaming) before any model loads: the configured columns
are in its first row (a webdataset sample lacking a member is that sample's fault when a
later one has it; none of the next LOOKAHEAD having it, the column is misnamed), and that
row's images open. An edit's references (data.reference_image_column) are optional per
row: a webdataset column of them is misnamed only when none of the first LOOKAHEAD
samples has the member."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from difftune.config import DataConfig
from difftune.data.edit_samples import open_references
from difftune.data.shards import KEY, PROBLEM, SHARD, has_references, reference_cell
from difftune.data.sources import Columns, DataError, ReferenceLimit, open_image
from difftune.data.streaming import SKIPPING, named_failures, no_member, open_stream, undecoded

logger = logging.getLogger(__name__)

LOOKAHEAD = 100
"""Samples read past a first one lacking a member before a run starts: a later one with
it makes that the sample's fault; none with it, a misnamed column."""


def check_stream(config: DataConfig, needs_conditioning: bool, fixed_caption: str | None,
                 references: bool = False, limit: ReferenceLimit | None = None) -> Columns:
    """The configured columns exist in the stream's first row, and its images open. With
    `references`, the conditioning column is an edit's references (data.reference_image_column),
    which a row may lack (it trains as text-to-image), and `limit` how many a row may have."""
    wanted = {"data.image_column": config.image_column}
    if fixed_caption is None:
        wanted["data.caption_column"] = config.caption_column
    if needs_conditioning and not references:
        wanted["data.conditioning_image_column"] = config.conditioning_image_column
    first, lacking = _first_row(config, tuple(wanted.values()))
    sample = f", sample {first[KEY]} of {first[SHARD]}" if first.get(SHARD) else ""
    seen = f"no sample of the first {lacking} has it; columns of the first" if lacking > 1 else \
        "columns of its first row"
    missing = [f"{key} = {name!r} is not a column of {config.path} ({seen}{sample}: {', '.join(first)})"
               for key, name in wanted.items() if first.get(name) is None]
    unnamed = _reference_column_problem(config, first) if needs_conditioning and references else None
    missing += [unnamed] if unnamed else []
    if missing:
        raise DataError("\n".join(missing))
    conditioning = config.reference_image_column if references else config.conditioning_image_column
    columns = Columns(image=config.image_column, caption=config.caption_column if fixed_caption is None else None,
                      conditioning=conditioning if needs_conditioning else None,
                      references=references and needs_conditioning)
    if config.on_bad == "error":  # else the run passes over a bad first row
        _open_first_row(config, first, columns, limit)
    return columns


def _open_first_row(config: DataConfig, first: dict[str, Any], columns: Columns, limit: ReferenceLimit | None) -> None:
    """The first row's images open (and an edit's references are no more than `limit`)."""
    def where(column: str) -> str:
        if first.get(SHARD):
            return f"{first[SHARD]}, member {first[KEY]}.{column} (the stream's first sample)"
        return f"{config.path}, first row, column {column!r}"

    open_image(first[columns.image], Path(config.path), where(columns.image))
    if columns.conditioning is not None and columns.references:
        open_references(reference_cell(first, columns.conditioning), Path(config.path),
                        where(columns.conditioning), limit)
    elif columns.conditioning is not None:
        open_image(first[columns.conditioning], Path(config.path), where(columns.conditioning))


def _reference_column_problem(config: DataConfig, first: dict[str, Any]) -> str | None:
    """Why data.reference_image_column names no column of the stream, if it names none. A
    row may have no reference; a webdataset sample then lacks the member, so the column
    is misnamed only when none of the first LOOKAHEAD samples has that member."""
    column = config.reference_image_column
    if not first.get(SHARD):
        return None if column in first else (f"data.reference_image_column = {column!r} is not a column of "
                                             f"{config.path} (columns of its first row: {', '.join(first)})")
    if has_references(first, column) or _member_seen(config, column):
        return None
    members = ", ".join(name for name in first if not name.startswith("__"))
    return (f"data.reference_image_column = {column!r}: no sample of the first {LOOKAHEAD} of {config.path} has "
            f"a member {column!r} (members of the first, sample {first[KEY]} of {first[SHARD]}: {members})")


def _member_seen(config: DataConfig, field: str) -> bool:
    """Whether a sample among the stream's first LOOKAHEAD has the member `field` (or,
    for references, its numbered members: shards.has_references)."""
    rows = named_failures(undecoded(open_stream(config)), config.path, lambda: "while its columns were checked")
    with contextlib.closing(rows):  # left part-read: closed here (named_failures)
        for number, row in enumerate(rows):
            if has_references(row, field):
                return True
            if number + 1 >= LOOKAHEAD:
                break
    return False


def _first_row(config: DataConfig, wanted: tuple[str, ...]) -> tuple[dict[str, Any], int]:
    """The stream's first row that is not a damaged shard or sample, and how many
    samples before it lacked a wanted member. Those stop the run, or with data.on_bad
    = "skip" are passed over (logged); but when no sample of the first LOOKAHEAD has
    the member, the first of them is returned: the column is misnamed, not the data."""
    passed_over, lacking = 0, []
    stream = undecoded(open_stream(config))
    for row in named_failures(stream, config.path, lambda: f"after {passed_over + len(lacking)} damaged row(s)"):
        if row.get(PROBLEM):
            if config.on_bad == "error":
                raise DataError(row[PROBLEM])
            passed_over += 1
            logger.warning(SKIPPING, row[PROBLEM])
        elif row.get(SHARD) and any(row.get(name) is None for name in wanted):  # a sample lacking a member
            lacking.append(row)
            if len(lacking) > LOOKAHEAD:
                break
        else:
            _pass_over_lacking(lacking, wanted, config.on_bad)
            return row, len(lacking)
    if lacking:
        return lacking[0], len(lacking)
    if passed_over:
        raise DataError(f"data.path {config.path!r}: no row of the stream can be trained on (data.on_bad = "
                        f"\"skip\" passed over {passed_over}, each logged)")
    raise DataError(f"data.path {config.path!r}: the {config.split!r} split has no rows")


def _pass_over_lacking(lacking: list[dict[str, Any]], wanted: tuple[str, ...], on_bad: str) -> None:
    """Samples lacking a member that a later sample has: the first stops the run, or
    with data.on_bad = "skip" each is passed over (logged)."""
    for row in lacking:
        problem = no_member(row, next(name for name in wanted if row.get(name) is None), "checked before training")
        if on_bad == "error":
            raise DataError(problem)
        logger.warning(SKIPPING, problem)
