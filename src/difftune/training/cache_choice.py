"""Whether a run trains from the encoded cache (data.cache_latents / cache_text): as the
config says, or, left unset, chosen here where the cache cannot change the result and
pays for itself.

The cache holds what the VAE and the text encoders would compute anyway (the posterior's
mean and std, both flips; each distinct caption's embedding), so a cached run trains as
an uncached one does (tests: within 1e-5, the VAE's batching being the only change).
It pays when each sample is seen at least twice: encoding all of them once costs as
much as one epoch of encoding (twice with random_flip, both sides being stored).

It is never chosen where it would be stale or cannot work: a random crop (differs every
epoch), a trained text encoder, a family whose embeddings depend on the batch (CogView4
pads to the batch's longest caption), a stream (read once), or a cache folder that
cannot hold it (not writable, a file, inside the training data). Each choice is said in
one line, with its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difftune.config import RunConfig
from difftune.paths import PathError, check_output_dir, default_cache_dir, within


@dataclass(frozen=True)
class CacheChoice:
    latents: bool
    text: bool
    notes: tuple[str, ...]
    """One line per cache the run chose (unset in the config), with why."""


def choose_caches(config: RunConfig, sample_count: int, family: Any, samples: Any = None) -> CacheChoice:
    """Settle data.cache_latents and data.cache_text (written into config.data)."""
    data = config.data
    for kind, wanted in (("latents", data.cache_latents), ("text", data.cache_text)):
        refused = wanted and reference_problem(config, family, samples, kind)  # (a stream's are refused earlier)
        if refused:
            from difftune.config import ConfigError

            raise ConfigError([f"data.cache_{kind} = true: {refused}; leave it unset or false"])
    visits = planned_visits(config, sample_count)
    per_sample = visits / max(sample_count, 1)
    notes = []
    latents, text = data.cache_latents, data.cache_text
    if latents is None:
        flips = 2 if data.random_flip else 1
        reason = _blocked(config, family, "latents", samples) or (
            f"the run sees each sample {per_sample:.1f} times; the latent cache pays from {2 * flips}"
            + (" (random_flip caches both sides)" if flips == 2 else "") if per_sample < 2 * flips else None)
        latents = reason is None
        notes.append(_note("latents", latents, reason, per_sample))
    if text is None:
        reason = _blocked(config, family, "text", samples) or (
            f"the run sees each sample {per_sample:.1f} times; the text cache pays from 2" if per_sample < 2 else None)
        text = reason is None
        notes.append(_note("text", text, reason, per_sample))
    data.cache_latents, data.cache_text = latents, text
    return CacheChoice(latents, text, tuple(notes))


def planned_visits(config: RunConfig, sample_count: int) -> int:
    """Samples the run will draw, all processes together."""
    train = config.train
    if train.max_steps is None:
        return train.epochs * sample_count
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return train.max_steps * train.batch_size * train.gradient_accumulation_steps * processes


def _blocked(config: RunConfig, family: Any, kind: str, samples: Any = None) -> str | None:
    """Why a cache of this kind would be stale or cannot work here, if it would."""
    data = config.data
    if data.streaming:
        return "data.streaming reads each row once"
    if kind == "latents" and not data.center_crop:
        return "data.center_crop = false: a random crop differs every epoch"
    if kind == "text" and config.method.trains_text_encoder:
        return f"method {config.method.kind!r} trains the text encoders, so the embeddings change as it trains"
    if kind == "text" and not family.caches_text:
        return f"family {family.name!r} embeds a caption differently in each batch"
    return reference_problem(config, family, samples, kind) or _folder_problem(data)


def reference_problem(config: RunConfig, family: Any, samples: Any, kind: str) -> str | None:
    """Why an edit run's cache of this kind cannot hold what its steps see, if it cannot:
    the latent cache holds one reference per row, encoded at the target's size."""
    if not config.method.takes_references:
        return None
    if kind == "text" and family.prompt_sees_references and (config.data.random_flip or not config.data.center_crop):
        # the cache holds each row's instruction encoded with its reference unflipped, centre-cropped
        return (f"family {family.name!r} encodes each instruction with its reference images, which data."
                + ("random_flip flips" if config.data.random_flip else "center_crop = false crops at random"))
    if kind == "latents" and samples is not None:
        counts = samples.reference_counts()
        odd = sum(count != 1 for count in counts)
        if odd:
            return f"{odd} of {len(counts)} rows have no reference or several; the latent cache holds one each"
    return None


def _folder_problem(data: Any) -> str | None:
    """What training.plan refuses for a cache set to true (a file, under a file, not
    writable, inside the training data), said as the reason to leave an unset one off."""
    folder = data.encoded_cache_dir or str(default_cache_dir())
    try:
        path = check_output_dir("data.encoded_cache_dir", folder)
    except PathError as error:
        return str(error)
    if Path(data.path).exists() and within(path, Path(data.path)):
        return f"data.encoded_cache_dir = {folder!r} is inside data.path: the cache would be read as training data"
    return None


def _note(kind: str, on: bool, reason: str | None, per_sample: float) -> str:
    key = f"data.cache_{kind}"
    if on:
        return f"{key} on (unset: the run sees each sample {per_sample:.1f} times; false encodes at every step)"
    return f"{key} off (unset: {reason})"
