"""The resume contract: a run continued from a checkpoint is the run that never stopped.
The config that resumes it is held against the one it was trained with (settings that
change what trains are refused, those in MAY_CHANGE are reported), the data against the
rows its checkpoint recorded, and the caches its start chose are kept."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from difftune.config import ConfigError, RunConfig, build_config, with_absolute_paths
from difftune.config.writing import toml_value
from difftune.data.rows import CheckedRows, data_identity
from difftune.rundir import RunDir
from difftune.training.checkpoint import CONFIG_FILE, DATA_FILE, ResumeError

# Keys that may differ between a run's checkpoint and the config that resumes it: they
# change how the run is watched, saved or sped up, not what it trains. A section name
# stands for all of its keys. max_steps and epochs may go up (to train longer).
MAY_CHANGE = (
    "train.max_steps", "train.epochs", "train.checkpoint_every", "train.checkpoints_total_limit",
    "train.log_every", "train.report_to", "train.tracker_project_name", "train.max_nonfinite_steps",
    "train.resume", "train.output_dir", "train.gradient_checkpointing", "train.compile", "train.attention", "train.allow_tf32",
    "train.channels_last", "train.set_grads_to_none",
    "data.num_workers", "data.cache_dir", "data.cache_latents", "data.cache_text", "data.encoded_cache_dir",
    "validation", "hub",
)


def check_same_data(checkpoint: Path, rows: CheckedRows) -> None:
    """The rows a resumed run trains on are those its checkpoint trained on (same files,
    captions and order): other rows would make other batches from here on."""
    recorded = checkpoint / DATA_FILE
    if not recorded.is_file():
        return  # written before difftune recorded it
    try:
        before = json.loads(recorded.read_text())
    except ValueError:
        return  # verified by the manifest; unreadable means written by another version
    now = data_identity(rows)
    if before != now:
        counts = before.get("rows"), now["rows"]
        what = (f"{counts[0]} rows were trained on then, {counts[1]} now" if counts[0] != counts[1]
                else f"the same {counts[1]} rows, but their files or captions differ")
        raise ResumeError(
            f"the training data changed since {checkpoint.name}: {what}. Resuming would draw other batches than "
            "the run did. Put the data back as it was to continue it; to train on the new data, start a new run "
            "in another train.output_dir.")


def keep_chosen_caches(config: RunConfig, recorded: dict[str, Any]) -> None:
    """A resumed run keeps the caches its start chose for settings left unset (the choice
    depends on max_steps, which a resumed run may raise): a run that switched the cache on
    or off halfway would not be the run that never stopped, bit for bit."""
    for key in ("cache_latents", "cache_text"):
        chosen = recorded.get("data", {}).get(key)
        if getattr(config.data, key) is None and isinstance(chosen, bool):
            setattr(config.data, key, chosen)


def recorded_config(run_dir: Path, checkpoint: Path | None) -> dict[str, Any] | None:
    """The config the run was trained with: the checkpoint's own copy, else the run's."""
    for path in ([checkpoint / CONFIG_FILE] if checkpoint is not None else []) + [RunDir(run_dir).config_file]:
        if path.is_file() and path.stat().st_size:
            try:
                return tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError):
                continue
    return None


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, name + ".")
        else:
            flat[name] = value
    return flat


def compare_configs(recorded: dict[str, Any], config: RunConfig, where: Path) -> list[str]:
    """The differences that may change, as sentences; raises listing those that may not."""
    try:  # defaults filled in, and local paths made absolute, the same way on both sides
        before = flatten(with_absolute_paths(build_config(recorded)).model_dump(exclude_none=True))
    except ConfigError:  # written by another version of difftune: compare what is there
        before = flatten(recorded)
    now = flatten(config.model_dump(exclude_none=True))
    allowed, refused = [], []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old == new:
            continue
        table = _table_on_one_side(key, before, now)
        if table is not None:  # a whole [table] added or removed: said once, not key by key
            had = any(k.startswith(table + ".") for k in before)
            line = (f"{table}: {f'[{table}]' if had else 'unset'} in the run, "
                    f"{'unset' if had else f'[{table}]'} now")
            if line not in refused:
                refused.append(line)
            continue
        if key in MAY_CHANGE or key.split(".")[0] in MAY_CHANGE:
            allowed.append(f"{key}: {_shown(old)} -> {_shown(new)}")
        else:
            refused.append(f"{key}: {_shown(old)} in the run, {_shown(new)} now")
    if refused:
        listed = "\n".join(f"  - {line}" for line in refused)
        raise ResumeError(
            f"the run in {config.train.output_dir} was trained with other settings (recorded with {where.name}); "
            f"continuing it with these would mix two runs:\n{listed}\n"
            "To continue the run, set those keys back. To start a new run with them, give another "
            "train.output_dir (for example --set train.output_dir=...)."
        )
    return allowed


def _table_on_one_side(key: str, before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The [section.table] a key belongs to, when the table exists on one side only."""
    parts = key.split(".")
    for depth in range(2, len(parts)):
        table = ".".join(parts[:depth]) + "."
        in_before = any(k.startswith(table) for k in before)
        in_now = any(k.startswith(table) for k in now)
        if in_before != in_now:
            return table[:-1]
    return None


def _shown(value: Any) -> str:
    """A value as the config file writes it (true, "text", [1, 2]), or "unset"."""
    return "unset" if value is None else toml_value(value)
