"""Encode once: VAE latents, text embeddings and conditioning images cached on disk.

diffusers' train_controlnet.py decodes every image and runs the VAE and the text encoder
at every step. With `data.cache_latents` / `data.cache_text`, difftune encodes each
sample once into safetensors shards and trains from them.

Never stale: every entry's key is a hash of everything that changes it.
- latents: the VAE weights (a hash of its tensors), its dtype, the family, resolution,
  crop, flip setting, and the bytes of the target and conditioning image files;
- text: the text-encoder weights and dtype, the tokenizer's vocabulary and length, and
  the caption text.
A changed image, caption or model re-encodes just the entries it changes; the rest are
read back. Shards are only ever added (and written under a temporary name, then
renamed), and the index is replaced atomically, so a killed run leaves a usable cache.

What is stored: the VAE posterior's mean and std, not a sample, so each step still
draws its own latent with the sample's generator (as without the cache); with
random_flip, both orientations; the conditioning image after its transform, as uint8;
one embedding per distinct caption, including "" for caption dropout.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from difftune.data.samples import PriorPreservationSamples, TrainingSamples, collate
from difftune.data.sources import image_source
from difftune.data.transforms import centre_geometry, paired_transform
from difftune.files import apply_umask

logger = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: text entries by the family's names, latent entries with geometry
SHARD_ENTRIES = 256
INDEX = "index.json"


def fingerprint(module: nn.Module) -> str:
    """A hash of a module's weights: names, dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # the bytes as a view (no copy of each tensor while hashing)
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _hash(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


class CacheStore:
    """Entries (a few named tensors each) in append-only safetensors shards, found
    through index.json: {key: shard file name}."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, str] = _read_index(folder / INDEX)
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._handles: dict[str, Any] = {}  # opened lazily, per process (DataLoader workers)

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self._pending

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        # clone: rows of one batch share storage, which safetensors refuses to save
        self._pending[key] = {name: t.detach().cpu().clone(memory_format=torch.contiguous_format)
                              for name, t in tensors.items()}
        if len(self._pending) >= SHARD_ENTRIES:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one new shard, then add them to the index.

        Several runs may share a cache: temporary names are this writer's own, and the
        index is re-read and merged under a lock, so no run's entries are lost."""
        if not self._pending:
            return
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        name = f"shard-{_hash(sorted(self._pending), token)}.safetensors"
        flat = {f"{key}/{field}": t for key, entry in self._pending.items() for field, t in entry.items()}
        partial = self.folder / f".{name}.partial"
        save_file(flat, partial)
        apply_umask(partial)  # the cache is shared: not safetensors' private 0600
        os.replace(partial, self.folder / name)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self.folder / INDEX
            merged = _read_index(index)
            merged.update(dict.fromkeys(self._pending, name))
            index_partial = self.folder / f".{INDEX}.{token}.partial"
            index_partial.write_text(json.dumps(merged))
            os.replace(index_partial, index)
        self.index = merged
        self._pending.clear()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        handle, fields = self._open(self.index[key])
        return {name.split("/", 1)[1]: handle.get_tensor(name) for name in fields[key]}

    def _open(self, shard: str) -> tuple[Any, dict[str, list[str]]]:
        """A shard's handle and its tensor names by entry key, read once per process
        (so a lookup on the training hot path does not scan the shard's names)."""
        if shard not in self._handles:
            handle = safe_open(str(self.folder / shard), framework="pt")
            fields: dict[str, list[str]] = {}
            for name in handle.keys():
                fields.setdefault(name.split("/", 1)[0], []).append(name)
            self._handles[shard] = (handle, fields)
        return self._handles[shard]

    def drop_unreadable(self) -> list[str]:
        """Forget the entries of shards that cannot be read back (truncated, zeroed,
        deleted): they are encoded again. Returns a sentence per bad shard."""
        problems = []
        for shard in sorted(set(self.index.values())):
            try:
                _, fields = self._open(shard)
                lacking = [key for key, name in self.index.items() if name == shard and key not in fields]
            except Exception as error:  # noqa: BLE001 (safetensors raises several kinds for a bad file)
                problems.append(f"{shard} is unreadable ({type(error).__name__}); its entries are encoded again")
                lacking = [key for key, name in self.index.items() if name == shard]
            else:
                if lacking:
                    problems.append(f"{shard} lacks {len(lacking)} entries; they are encoded again")
            for key in lacking:
                del self.index[key]
        return problems

    def __getstate__(self) -> dict[str, Any]:
        # safetensors handles do not pickle; each DataLoader worker opens its own.
        return {**self.__dict__, "_handles": {}}


class EncodedSamples(Dataset):
    """Training samples read from the cache: latent mean/std (for the sample's flip),
    the text embedding of its caption, the conditioning image. The random choices are
    the TrainingSamples' own (`plan`), so a cached run sees the same samples."""

    def __init__(self, samples: TrainingSamples, latents: CacheStore | None, latent_keys: list[str],
                 texts: CacheStore | None, text_keys: dict[str, str]) -> None:
        self.samples = samples
        self.latents, self.latent_keys = latents, latent_keys
        self.texts, self.text_keys = texts, text_keys
        self.report = samples.report
        self.sizes = samples.sizes  # aspect buckets, for the batch sampler

    def __len__(self) -> int:
        return len(self.samples)

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
            if f"{side}_conditioning_mean" in entry:
                sample["conditioning_latent_mean"] = entry[f"{side}_conditioning_mean"]
            plan_caption = plan.caption
        if self.texts is not None:
            sample["text"] = self.texts.get(self.text_keys[plan_caption])
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
    latents, latent_keys = None, []
    texts, text_keys = None, {}
    if cache_latents:
        latent_keys = [_latent_key(samples, i, conditioning_latents) for i in range(len(samples))]
        latent_folder = folder / "latents" / _latent_context(samples, family, parts)
        missing = _missing(latent_folder, dict(enumerate(latent_keys)), processes)
        stats["latents_encoded"], stats["latents_reused"] = len(missing), len(set(latent_keys)) - len(missing)
        mine = [i for i in missing if _owner(latent_keys[i], processes.count) == processes.index]
        processes.run_share(lambda: _encode_latents(samples, family, parts, CacheStore(latent_folder), latent_keys,
                                                    mine, batch_size, conditioning_latents))
        latents = _complete(CacheStore(latent_folder), latent_keys)
    if cache_text:
        # sorted: a set's order differs between processes (string hashing is salted per process)
        text_keys = {caption: _hash(caption) for caption in sorted(samples.caption_options())}
        text_folder = folder / "text" / _text_context(family, parts)
        missing = _missing(text_folder, text_keys, processes)
        stats["texts_encoded"], stats["texts_reused"] = len(missing), len(text_keys) - len(missing)
        mine = [c for c in missing if _owner(text_keys[c], processes.count) == processes.index]
        processes.run_share(lambda: _encode_texts(family, parts, CacheStore(text_folder), text_keys, mine, batch_size))
        texts = _complete(CacheStore(text_folder), list(text_keys.values()))
    return EncodedSamples(samples, latents, latent_keys, texts, text_keys), stats


def _read_index(path: Path) -> dict[str, str]:
    """{key: shard}; a damaged index counts as empty (everything is encoded again, and
    the next flush writes a sound one)."""
    if not path.is_file():
        return {}
    try:
        index = json.loads(path.read_text())
    except (ValueError, OSError):
        return {}
    return index if isinstance(index, dict) and all(isinstance(v, str) for v in index.values()) else {}


def _missing(folder: Path, keys: dict[Any, str], processes: Processes) -> list[Any]:
    """The items whose key the cache lacks or holds in a damaged shard, one per distinct
    key, in order. Every process reads the index before any of them writes to it, so the
    counts reported are this run's (without the barrier a fast process's entries would
    count as reused)."""
    store = CacheStore(folder)
    for problem in store.drop_unreadable():
        if processes.index == 0:
            logger.warning("cache %s: %s", folder, problem)
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


def _complete(store: CacheStore, keys: list[str]) -> CacheStore:
    lacking = sum(key not in store for key in set(keys))
    if lacking:
        raise RuntimeError(f"cache {store.folder}: {lacking} entries were not written (a process failed?)")
    return store


def _latent_context(samples: TrainingSamples, family: Any, parts: Any) -> str:
    config = samples.config
    return _hash(CACHE_VERSION, family.name, fingerprint(parts.vae), str(next(parts.vae.parameters()).dtype),
                 config.resolution, config.center_crop, config.random_flip)


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
        plain, flipped, conditionings = [], [], []
        entries: list[dict[str, torch.Tensor]] = []
        for index in chunk:
            image, conditioning = samples.images(samples.row_numbers[index], index)
            size = samples.size_of(index)
            pixels, cond, geometry = paired_transform(image, conditioning, size, True, False, None)
            plain.append(pixels)
            flipped.append(pixels.flip(-1))
            conditionings.append(cond)
            entries.append({"plain_geometry": geometry, "flipped_geometry": centre_geometry(image.size, size, True)})
        sides = [("plain", plain)] + ([("flipped", flipped)] if config.random_flip else [])
        for side, images in sides:
            mean, std = family.latent_distribution(parts, torch.stack(images))
            for entry, m, s in zip(entries, mean, std):
                entry[f"{side}_mean"], entry[f"{side}_std"] = m, s
            if conditioning_latents and conditionings[0] is not None:  # the VAE takes [-1, 1]
                controls = torch.stack([c if side == "plain" else c.flip(-1) for c in conditionings]) * 2 - 1
                for entry, m in zip(entries, family.latent_distribution(parts, controls)[0]):
                    entry[f"{side}_conditioning_mean"] = m
        for index, entry, cond in zip(chunk, entries, conditionings):
            if cond is not None:
                entry["conditioning"] = (cond * 255.0).round().to(torch.uint8)
            store.put(keys[index], entry)
    store.flush()


@torch.no_grad()
def _encode_texts(family: Any, parts: Any, store: CacheStore, keys: dict[str, str],
                  missing: list[str], batch_size: int) -> None:
    for chunk in _batches(missing, batch_size):
        encoded = family.encode_prompts(parts, chunk)  # {name: (len(chunk), ...)}
        for row, caption in enumerate(chunk):
            store.put(keys[caption], {name: tensor[row] for name, tensor in encoded.items()})
    store.flush()
