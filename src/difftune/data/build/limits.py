"""The numeric flags of `difftune data prepare|condition|caption`, checked before any
work starts (nothing read, no OUT made), each refusal one sentence naming the flag.

Without these, a value out of range misbehaves quietly: `--shard-size 0` loops on an
empty range, `--workers 0` means "every core", a NaN `--max-aspect` or `--min-sharpness`
makes every comparison false (nothing is dropped), `--batch-size 0` never advances.
The library functions check too, so a script calling `prepare()` gets the same sentence.
"""

from __future__ import annotations

import math
from typing import Any

from difftune.errors import InputError


def check_whole(flag: str, value: Any, low: int, high: int | None = None, optional: bool = False) -> None:
    """An integer within [low, high] (None: unbounded above); `optional`: None allowed."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise InputError(f"{flag} {value}: give a whole number {bound}")


def check_number(flag: str, value: Any, low: float, high: float | None = None) -> None:
    """A finite number within [low, high] (None: unbounded above)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (high is not None and value > high):
        bound = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
        shown = f"{value:g}" if isinstance(value, float) else value
        raise InputError(f"{flag} {shown}: give a finite number {bound}")


def check_prepare(settings: Any, workers: int | None, shard_size: int) -> None:
    """prepare's flags (settings: a filters.FilterSettings)."""
    check_whole("--min-size", settings.min_size, 0)
    check_number("--max-aspect", settings.max_aspect, 1.0)  # long side over short: never under 1
    check_number("--min-bytes-per-megapixel", settings.min_bytes_per_megapixel, 0.0)
    check_number("--min-sharpness", settings.min_sharpness, 0.0)
    check_whole("--phash-distance", settings.phash_distance, -1, 64)  # -1: off; a pHash has 64 bits
    check_whole("--workers", workers, 1, optional=True)
    check_whole("--shard-size", shard_size, 1)


def check_condition(settings: Any, workers: int | None) -> None:
    """condition's flags (settings: a conditioning.ConditionSettings)."""
    check_whole("--low", settings.low, 0)
    check_whole("--high", settings.high, 0)
    check_whole("--jitter", settings.jitter, 0)
    check_whole("--batch-size", settings.batch_size, 1)
    check_number("--min-score", settings.min_score, 0.0, 1.0)  # a keypoint's score is a probability
    check_whole("--workers", workers, 1, optional=True)


def check_caption(settings: Any) -> None:
    """caption's flags (settings: a captioning.CaptionSettings)."""
    check_whole("--batch-size", settings.batch_size, 1)
    check_whole("--max-new-tokens", settings.max_new_tokens, 1)
