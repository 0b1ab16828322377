"""Encode once: VAE latents, text embeddings and conditioning images cached on disk.

diffusers' train_controlnet.py decodes every image and runs the VAE and the text encoder
at every step. With `data.cache_latents` / `data.cache_text`, difftune encodes each
sample once into safetensors shards and trains from them.

Never stale: every entry's key is a hash of everything that changes it.
- latents: the VAE encoder's weights (a hash of its tensors), its dtype, the family, resolution,
  crop, flip setting, and the bytes of the target and conditioning image files;
- text: the text-encoder weights and dtype, the tokenizer's vocabulary and length, and
  the caption text; where the encoder reads an edit's references with it (Qwen-Image-Edit),
  one entry per row and caption, keyed by the references' bytes and size too.
A changed image, caption or model re-encodes just the entries it changes; the rest are
read back. Shards are only ever added (and written under a temporary name, then
renamed), and the index is replaced atomically, so a killed run leaves a usable cache.
Never trusted: each shard is checked against its checksum before it is read, and a
damaged one is encoded again (cache_store.py). A run holds a lock on each context it
uses until it closes the dataset (`close_cache`), so `difftune cache clear` leaves it.

What is stored: the VAE posterior's mean and std, not a sample, so each step still
draws its own latent with the sample's generator (as without the cache); with
random_flip, both orientations; the conditioning image after its transform, as uint8;
one embedding per distinct caption, including "" for caption dropout (unpadded: a family
whose batches pad prompts to their longest has them padded in each batch, `stack_padded`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from difftune.data.cache_store import CacheStore
from difftune.data.edit_samples import OWN_SIZE_RESAMPLING
from difftune.data.samples import PriorPreservationSamples, TrainingSamples, collate
from difftune.data.sources import image_source, reference_cells
from difftune.data.transforms import centre_geometry, paired_transform

logger = logging.getLogger(__name__)
# 2: text entries by the family's names, latent entries with geometry; 3: shards with
# checksums (cache_manifest.py). A version-2 cache is another context, never read: it is
# encoded again rather than checked and recorded, since a checksum taken now would bless
# whatever damage its shards already have. `difftune cache clear` removes it.
CACHE_VERSION = 3


DECODER_PARTS = ("decoder.", "post_quant_conv.")
"""A diffusers VAE's parts after the latent (every AutoencoderKL* names them so): the latent
cache holds the encoder's posterior, so a VAE whose decoder alone changed (a fine-tuned
decoder, such as sd-vae-ft-mse's) reads the same entries."""


def fingerprint(module: nn.Module, leave_out: tuple[str, ...] = ()) -> str:
    """A hash of a module's weights: names, dtypes, shapes and bytes (those whose names start
    with `leave_out` left out)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        if leave_out and name.startswith(leave_out):
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # the bytes as a view (no copy of each tensor while hashing)
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _hash(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


class EncodedSamples(Dataset):
    """Training samples read from the cache: latent mean/std (for the sample's flip),
    the text embedding of its caption, the conditioning image. The random choices are
    the TrainingSamples' own (`plan`), so a cached run sees the same samples."""

    def __init__(self, samples: TrainingSamples, latents: CacheStore | None, latent_keys: list[str],
                 texts: CacheStore | None, text_keys: dict[Any, str], per_row: bool = False) -> None:
        self.samples = samples
        self.latents, self.latent_keys = latents, latent_keys
        self.texts, self.text_keys = texts, text_keys
        self.per_row = per_row
        """Text entries by (sample index, caption): the instruction's encoding sees the row's
        references (Qwen-Image-Edit), not by caption alone."""
        self.report = samples.report
        self.sizes = samples.sizes  # aspect buckets, for the batch sampler

    def __len__(self) -> int:
        return len(self.samples)

    def close(self) -> None:
        for store in (self.latents, self.texts):
            if store is not None:
                store.close()

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        if self.latents is None:
            sample = self.samples[key]
            plan_caption = sample["caption"]
        else:
            plan = self.samples.plan(epoch, index)
            entry = self.latents.get(self.latent_keys[index])
            side = "flipped" if plan.flip else "plain"
            sample = {"latent_mean": entry[f"{side}_mean"], "latent_std": entry[f"{side}_std"],
                      "geometry": entry[f"{side}_geometry"], "caption": plan.caption, "key": (epoch, index, 0)}
            if "conditioning" in entry:
                conditioning = entry["conditioning"].float() / 255.0
                sample["conditioning_pixels"] = conditioning.flip(-1) if plan.flip else conditioning
            elif f"{side}_conditioning_mean" in entry and self.texts is None:
                # an edit's reference at a size of its own, read again for the instruction's encoding
                reference = self.samples.references(plan.row, index)[0]
                sample["conditioning_pixels"] = self.samples.sized_reference(
                    reference, self.samples.size_of(index), plan.flip)
            if f"{side}_conditioning_mean" in entry:
                sample["conditioning_latent_mean"] = entry[f"{side}_conditioning_mean"]
            plan_caption = plan.caption
        if self.texts is not None:
            sample["text"] = self.texts.get(self.text_keys[(index, plan_caption) if self.per_row else plan_caption])
        return sample

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples)


STAT_NAMES = ("latents_encoded", "latents_reused", "texts_encoded", "texts_reused")


@dataclass(frozen=True)
class Processes:
    """The processes that share the encoding: this one's index, how many, a barrier, and
    `any_of(flag)`: whether the flag is set on any process (on every process)."""

    index: int = 0
    count: int = 1
    wait: Callable[[], None] = lambda: None
    any_of: Callable[[bool], bool] = lambda flag: flag

    def run_share(self, encode: Callable[[], None]) -> None:
        """Encode this process's share; if any process fails, every process raises
        (instead of the others waiting at the next barrier until the timeout)."""
        error: Exception | None = None
        try:
            encode()
        except Exception as caught:
            error = caught
        if self.any_of(error is not None):
            raise error or RuntimeError("another process failed while encoding the cache; see its error")
        self.wait()


def build_cache(
    samples: TrainingSamples | PriorPreservationSamples,
    family: Any,
    parts: Any,
    cache_latents: bool,
    cache_text: bool,
    folder: Path,
    batch_size: int,
    processes: Processes,
    conditioning_latents: bool = False,
) -> tuple[EncodedSamples | PriorPreservationSamples, dict[str, int]]:
    """Encode what the cache lacks, each process its share, then read it everywhere.
    conditioning_latents: the latent cache also holds the conditioning image's VAE
    posterior mean (channel-concat Control), both flip sides.
    DreamBooth pairs are cached half by half. Returns the cached dataset and
    {"latents_encoded", "latents_reused", "texts_encoded", "texts_reused"} (all processes)."""
    if isinstance(samples, PriorPreservationSamples):
        totals: Counter[str] = Counter()

        def encode(half: TrainingSamples) -> EncodedSamples:
            encoded, stats = build_cache(half, family, parts, cache_latents, cache_text, folder, batch_size, processes,
                                         conditioning_latents)
            totals.update(stats)
            return encoded  # type: ignore[return-value]

        return samples.map(encode), {**dict.fromkeys(STAT_NAMES, 0), **totals}
    stats = dict.fromkeys(STAT_NAMES, 0)
    latents: CacheStore | None = None
    texts: CacheStore | None = None
    latent_keys: list[str] = []
    text_keys: dict[str, str] = {}
    if cache_latents:
        latent_keys = [_latent_key(samples, i, conditioning_latents) for i in range(len(samples))]
        latents = CacheStore(folder / "latents" / _latent_context(samples, family, parts))
        missing = _missing(latents, dict(enumerate(latent_keys)), processes)
        stats["latents_encoded"], stats["latents_reused"] = len(missing), len(set(latent_keys)) - len(missing)
        mine = [i for i in missing if _owner(latent_keys[i], processes.count) == processes.index]
        processes.run_share(lambda: _encode_latents(samples, family, parts, latents, latent_keys,
                                                    mine, batch_size, conditioning_latents))
        _complete(latents, latent_keys)
    per_row = bool(samples.columns.references) and family.prompt_sees_references
    if cache_text:
        text_keys = _instruction_keys(samples) if per_row else _caption_keys(samples)
        texts = CacheStore(folder / "text" / _text_context(family, parts))
        missing = _missing(texts, text_keys, processes)
        stats["texts_encoded"], stats["texts_reused"] = len(missing), len(set(text_keys.values())) - len(missing)
        mine = [c for c in missing if _owner(text_keys[c], processes.count) == processes.index]
        encode = _encode_instructions if per_row else _encode_texts
        processes.run_share(lambda: encode(samples, family, parts, texts, text_keys, mine, batch_size))
        _complete(texts, list(text_keys.values()))
    return EncodedSamples(samples, latents, latent_keys, texts, text_keys, per_row), stats


def _caption_keys(samples: TrainingSamples) -> dict[str, str]:
    """Each caption a sample can draw, by its key."""
    # sorted: a set's order differs between processes (string hashing is salted per process)
    return {caption: _hash(caption) for caption in sorted(samples.caption_options())}


def _instruction_keys(samples: TrainingSamples) -> dict[tuple[int, str], str]:
    """(sample index, caption) for every caption each sample can draw, by a key of the caption,
    the sample's size and the bytes of its references (what the encoder sees of them)."""
    column = samples.columns.conditioning
    cells = samples.rows.select_columns([column]).with_format("python")[column]
    keys = {}
    for index in range(len(samples)):
        row = samples.row_numbers[index]
        digest = hashlib.blake2b(repr(samples.size_of(index)).encode(), digest_size=16)
        for cell in reference_cells(cells[row]):
            digest.update(_cell_bytes(cell, samples.root))
            digest.update(b"|")
        for caption in sorted(samples.caption_options(index)):
            keys[(index, caption)] = _hash("instruction", caption, digest.hexdigest())
    return keys


def close_cache(samples: Any) -> None:
    """Let go of the cache contexts a dataset from build_cache holds (then `difftune cache
    clear` may remove them); anything else is left as it is."""
    for half in (samples, getattr(samples, "instances", None), getattr(samples, "classes", None)):
        if isinstance(half, EncodedSamples):
            half.close()


def _missing(store: CacheStore, keys: dict[Any, str], processes: Processes) -> list[Any]:
    """The items whose key the cache lacks or holds in a damaged shard, one per distinct
    key, in order. Every process reads the index before any of them writes to it, so the
    counts reported are this run's (without the barrier a fast process's entries would
    count as reused)."""
    for problem in store.drop_damaged(keys.values()):
        if processes.index == 0:
            logger.warning("cache %s: %s", store.folder, problem)
    seen: set[str] = set()
    missing = []
    for item, key in keys.items():
        if key not in store and key not in seen:
            seen.add(key)
            missing.append(item)
    processes.wait()
    return missing


def _owner(key: str, count: int) -> int:
    """The process that encodes a missing entry: fixed by its key, so processes that read
    the index at different moments (another run sharing the cache may be writing it)
    still leave no entry to nobody."""
    return int(key[:8], 16) % count


def _complete(store: CacheStore, keys: list[str]) -> None:
    """Every key is in the index, in a shard that passes its check (the other processes'
    new shards are checked here, once, before training reads them)."""
    store.reload()
    problems = store.drop_damaged(keys)
    lacking = sum(key not in store for key in set(keys))
    if lacking:
        raise RuntimeError(f"cache {store.folder}: {lacking} entries were not written (a process failed?)"
                           + "".join(f"; {problem}" for problem in problems))


def _latent_context(samples: TrainingSamples, family: Any, parts: Any) -> str:
    config = samples.config
    # references at a size of their own (Qwen-Image-Edit's): their resampling too, which has changed
    own_size = ("references resized with", OWN_SIZE_RESAMPLING.name) if getattr(samples, "reference_size", None) else ()
    encoder = fingerprint(parts.vae, DECODER_PARTS)
    return _hash(CACHE_VERSION, family.name, encoder, str(next(parts.vae.parameters()).dtype),
                 config.resolution, config.center_crop, config.random_flip, *own_size)


def _text_context(family: Any, parts: Any) -> str:
    """Every text encoder's weights and dtype, and the tokenizers (family.text_cache_identity)."""
    encoders = [(fingerprint(encoder), str(next(encoder.parameters()).dtype)) for encoder in parts.text_encoders]
    return _hash(CACHE_VERSION, family.name, encoders, family.text_cache_identity(parts))


def _latent_key(samples: TrainingSamples, index: int, conditioning_latents: bool = False) -> str:
    """A hash of the sample's size (square or bucket) and the bytes of its image files
    (or embedded images); an entry with the conditioning's latents has its own key."""
    row = samples.rows[samples.row_numbers[index]]
    digest = hashlib.blake2b(digest_size=16)
    if conditioning_latents:
        digest.update(b"conditioning-latents|")
    digest.update(repr(samples.size_of(index)).encode())
    for column in (samples.columns.image, samples.columns.conditioning):
        if column is not None:
            digest.update(_cell_bytes(row[column], samples.root))
            digest.update(b"|")
    return digest.hexdigest()


def _cell_bytes(value: Any, root: Path) -> bytes:
    source = image_source(value, root)
    if isinstance(source, Path):
        return source.read_bytes()
    return source.getvalue() if source is not None else repr(value).encode()


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def _encode_latents(samples: TrainingSamples, family: Any, parts: Any, store: CacheStore,
                    keys: list[str], missing: list[int], batch_size: int, conditioning_latents: bool = False) -> None:
    config = samples.config
    by_size: dict[tuple[int, int], list[int]] = {}
    for index in missing:  # one VAE batch holds one size (aspect buckets)
        by_size.setdefault(samples.size_of(index), []).append(index)
    chunks = [chunk for group in by_size.values() for chunk in _batches(group, batch_size)]
    for chunk in chunks:
        plain, flipped, conditionings, owns = [], [], [], []
        entries: list[dict[str, torch.Tensor]] = []
        for index in chunk:
            image, conditioning = samples.images(samples.row_numbers[index], index)
            size = samples.size_of(index)
            # an edit's reference at a size of its own is resized whole, not cropped with the target
            own = conditioning is not None and samples.columns.references and samples.own_size(conditioning.size, size)
            pixels, cond, geometry = paired_transform(image, None if own else conditioning, size, True, False, None)
            if own:
                cond = samples.sized_reference(conditioning, size, False)
            owns.append(bool(own))
            plain.append(pixels)
            flipped.append(pixels.flip(-1))
            conditionings.append(cond)
            entries.append({"plain_geometry": geometry, "flipped_geometry": centre_geometry(image.size, size, True)})
        sides = [("plain", plain)] + ([("flipped", flipped)] if config.random_flip else [])
        for side, images in sides:
            mean, std = family.latent_distribution(parts, torch.stack(images))
            for entry, m, s in zip(entries, mean, std):
                entry[f"{side}_mean"], entry[f"{side}_std"] = m, s
            if conditioning_latents:
                _encode_conditionings(family, parts, entries, conditionings, side)
        for index, entry, cond, own in zip(chunk, entries, conditionings, owns):
            if cond is not None and not own:  # (one at a size of its own is read again: EncodedSamples)
                entry["conditioning"] = (cond * 255.0).round().to(torch.uint8)
            store.put(keys[index], entry)
    store.flush()


def _encode_conditionings(family: Any, parts: Any, entries: list[dict], conditionings: list[Any], side: str) -> None:
    """The conditioning images' posterior means (the VAE takes [-1, 1]), one VAE batch per
    size (an edit's references may have sizes of their own)."""
    by_shape: dict[tuple, list[int]] = {}
    for number, cond in enumerate(conditionings):
        if cond is not None:
            by_shape.setdefault(tuple(cond.shape), []).append(number)
    for numbers in by_shape.values():
        controls = torch.stack([conditionings[n] if side == "plain" else conditionings[n].flip(-1)
                                for n in numbers]) * 2 - 1
        for number, mean in zip(numbers, family.latent_distribution(parts, controls)[0]):
            entries[number][f"{side}_conditioning_mean"] = mean


@torch.no_grad()
def _encode_texts(samples: TrainingSamples, family: Any, parts: Any, store: CacheStore, keys: dict[str, str],
                  missing: list[str], batch_size: int) -> None:
    for chunk in _batches(missing, batch_size):
        encoded = family.encode_prompts(parts, chunk)  # {name: (len(chunk), ...)}
        for row, caption in enumerate(chunk):
            store.put(keys[caption], family.cached_prompt(encoded, row))
    store.flush()


@torch.no_grad()
def _encode_instructions(samples: TrainingSamples, family: Any, parts: Any, store: CacheStore,
                         keys: dict[tuple[int, str], str], missing: list[tuple[int, str]], batch_size: int) -> None:
    """Each (sample, caption)'s instruction encoded with the sample's references, as its steps
    would encode it (unflipped, centre-cropped: the cache is chosen only then)."""
    for chunk in _batches(missing, batch_size):
        references = [samples.unaugmented_references(index) for index, _ in chunk]
        encoded = family.encode_edit_prompts(parts, [caption for _, caption in chunk], references)
        for row, item in enumerate(chunk):
            store.put(keys[item], family.cached_prompt(encoded, row))
    store.flush()
