"""What `train` will do with its run directory, decided before torch is imported.

A run directory holds one run. Starting `train` on it either starts that run, continues
it from a checkpoint, or finds it finished; never anything that mixes two runs or throws
finished work away:

- the paths the config names are checked first (models, output directory, data,
  validation images), before the run directory is created;
- one process at a time: a lock file in the run directory;
- a checkpoint is verified before it is used (a damaged one is passed over, saying so);
- resuming with settings that change the run itself (learning rate, data, batch size,
  model, method...) is refused with the list of differences; settings that only change
  how the run is watched, saved or sped up may change (`MAY_CHANGE`), and each change
  is reported and recorded;
- a finished run is not trained again: it says where its result is.
"""

from __future__ import annotations

import json
import logging
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difftune.config import (
    ConfigError,
    RunConfig,
    build_config,
    with_absolute_paths,
)
from difftune.config.writing import toml_value
from difftune.data.rows import CheckedRows, check_rows, data_identity
from difftune.data.sources import IMAGE_SUFFIXES, image_problem
from difftune.errors import DataError
from difftune.paths import (
    check_controlnet_fits,
    check_model_folder,
    check_output_dir,
    check_pipeline,
    check_tokenizer,
    check_vae_fits,
    default_cache_dir,
    looks_like_path,
    offline_if_hub_unreachable,
    within,
)
from difftune.training.checkpoint import (
    CONFIG_FILE,
    DATA_FILE,
    MARKER,
    ResumeError,
    check_nothing_newer,
    checkpoint_dir,
    checkpoint_step,
    is_checkpoint_name,
    pick_checkpoint,
)
from difftune.training.final import finished_step
from difftune.rundir import RunDir
from difftune.training.rundir import check_run_directory, take_lock

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
logger = logging.getLogger(__name__)


@dataclass
class RunPlan:
    config: RunConfig
    """The config to run: local paths made absolute (config.with_absolute_paths)."""
    run_dir: Path
    resume_from: Path | None = None
    finished_at: int | None = None
    """The run already finished at this step: there is nothing to train."""
    data: CheckedRows | None = None
    """The training rows, checked (None for a finished run: nothing to train)."""
    changes: list[str] = field(default_factory=list)
    """Settings that differ from the checkpoint's and may (MAY_CHANGE), as "key: old -> new"."""
    skipped: list[str] = field(default_factory=list)
    """Damaged checkpoints passed over, each with why."""
    lock: Any = None


def main_process_by_environment() -> bool:
    """Whether this is the main process of a launch (torchrun and accelerate set RANK),
    known before the accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


def plan_run(config: RunConfig, main_process: bool = True) -> RunPlan:
    """Check the paths, take the run directory's lock, pick the checkpoint and hold the
    config and the data against it. Raises a UserError naming the problem; creates only
    the run directory and its lock file, and only once everything is sound (an existing
    run directory is locked first, so no other run changes it while it is read)."""
    config = with_resume_kept(with_absolute_paths(config), config.train.resume)
    check_sources(config)
    run_dir = check_output_dir("train.output_dir", config.train.output_dir)
    check_run_directory(run_dir, config)
    plan = RunPlan(config, run_dir)
    if main_process and run_dir.is_dir():
        plan.lock = take_lock(run_dir)
    plan.resume_from, plan.skipped = pick_checkpoint(run_dir, config.train.resume)
    recorded = recorded_config(run_dir, plan.resume_from)
    if recorded is not None and plan.resume_from is not None:
        keep_chosen_caches(config, recorded)
    finished = finished_step(run_dir)
    if recorded is not None and (plan.resume_from is not None or finished is not None):
        plan.changes = compare_configs(recorded, config, plan.resume_from or run_dir)
    at = checkpoint_step(plan.resume_from) if plan.resume_from is not None else 0
    if finished is not None and _reached(config, recorded, finished):
        plan.finished_at = finished
    elif finished is not None and plan.resume_from is None:
        raise ResumeError(
            f"{run_dir} finished at step {finished} and has no checkpoint to continue from: training longer "
            "would start again from step 0. Start a new run in another train.output_dir (its base can be "
            f"this run's result, {run_dir / 'final'}).")
    elif config.train.max_steps is not None and at > config.train.max_steps:
        raise ResumeError(
            f"train.max_steps = {config.train.max_steps}, but the run in {run_dir} is at step {at} "
            f"({plan.resume_from.name if plan.resume_from else ''}): a run cannot go back. Raise max_steps "
            "to continue it, or give another train.output_dir for a new run.")
    if plan.finished_at is None and plan.resume_from is not None:
        check_nothing_newer(run_dir, plan.resume_from, config.train.resume)
    if plan.finished_at is None and not config.data.streaming:  # a stream is checked as it is read
        method = config.method
        plan.data = check_rows(config.data, config.train.seed, method.needs_conditioning, method.fixed_caption)
        if plan.resume_from is not None:
            check_same_data(plan.resume_from, plan.data)
    if main_process and plan.lock is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        plan.lock = take_lock(run_dir)
    return plan


def with_resume_kept(config: RunConfig, given: str | None) -> RunConfig:
    """A bare checkpoint name in train.resume stays a name (a checkpoint of this run,
    checkpoint.resume_path), where making paths absolute would have turned it into a
    folder of that name in the current directory, had one been there."""
    if given is not None and is_checkpoint_name(given):
        config.train.resume = given
    return config


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


def check_sources(config: RunConfig) -> None:
    """The models and files the config names exist and are what they should be."""
    model = config.model
    named = [model.pretrained, model.tokenizer, model.vae, *config.method.model_folders().values(),
             config.data.path, config.validation.metric_data]
    if any(value and not Path(value).expanduser().exists() and not looks_like_path(value) for value in named):
        note = offline_if_hub_unreachable()
        if note:
            logger.warning(note)
    from difftune.families import check_base, check_sizes_fit, get_family

    components = dict(get_family(model.family).components)
    if model.tokenizer:
        check_tokenizer("model.tokenizer", model.tokenizer, model.revision)
        components.pop("tokenizer", None)
    if model.vae:
        check_model_folder("model.vae", model.vae, "AutoencoderKL", revision=model.revision)
        components.pop("vae", None)
    # the family first: an SD folder named "sdxl" is another family's base, not one that lacks a part
    check_base("model.pretrained", model.pretrained, model.family, "model.family", model.revision)
    check_pipeline("model.pretrained", model.pretrained, components, model.variant, model.revision)
    if model.vae:
        check_vae_fits("model.vae", model.vae, model.pretrained)
    family = get_family(model.family)
    # data.resolution is also the validation and class-image size
    sizes: dict[str, int] = {"data.resolution": config.data.resolution} | (
        {"data.bucket_step": config.data.bucket_step} if config.data.buckets else {})
    check_sizes_fit(sizes, family, model.pretrained, model.vae, model.revision)
    problems = family.method_problems(config.method, model.pretrained, model.revision)
    if problems:
        raise ConfigError(problems, "the config, for this base")
    for key, folder in config.method.model_folders().items():
        check_model_folder(key, folder, "ControlNet")
        check_controlnet_fits(key, folder, model.pretrained, family.denoiser_name)
    for key, value in (("data.path", config.data.path), ("validation.metric_data", config.validation.metric_data)):
        if value and looks_like_path(value) and not Path(value).exists():
            raise DataError(f"{key} = {value!r}: no such folder or file")
        if value and Path(value).exists() and not Path(value).is_dir():
            raise DataError(f"{key} = {value!r} is a file, not a dataset: give the dataset's folder (or a Hub "
                            "dataset name)")
    check_class_data(config)
    check_written_folders(config)
    for index, image in enumerate(config.validation.images):
        problem = image_problem(Path(image))
        if problem == "no such file":
            raise DataError(f"validation.images[{index}]: no such file {image}")
        if problem:
            raise DataError(f"validation.images[{index}]: {image}: {problem}")
    if config.hub.push:
        check_hub_push()


def check_hub_push() -> None:
    """hub.push uploads after training: refuse now, not after hours, if it cannot."""
    if not os.environ.get("HF_HUB_OFFLINE"):
        offline_if_hub_unreachable()
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ResumeError("hub.push = true, but the Hub cannot be reached (HF_HUB_OFFLINE is set, or no network): "
                          "the result could not be uploaded. Set hub.push = false (upload final/ later with "
                          "`hf upload`), or train where the Hub is reachable.")
    from huggingface_hub import get_token

    if get_token() is None:
        raise ResumeError("hub.push = true, but no Hub token is set: log in with `hf auth login` (or set "
                          "HF_TOKEN) before training, or set hub.push = false.")


def check_written_folders(config: RunConfig) -> None:
    """Folders a run writes besides its own: DreamBooth's class images and the encoded
    cache, writable, and never inside the training data."""
    data = config.data
    folders = list(config.method.image_folders().items())
    if data.cache_latents is True or data.cache_text is True:  # unset: chosen only where writable
        folders.append(("data.encoded_cache_dir", data.encoded_cache_dir or str(default_cache_dir())))
    for key, value in folders:
        check_output_dir(key, value)
        if key == "data.encoded_cache_dir" and Path(data.path).exists() and within(Path(value), Path(data.path)):
            raise DataError(f"{key} = {value!r} is inside data.path {data.path!r}: the cache would be read as "
                            "training data. Give it a folder of its own.")


def check_class_data(config: RunConfig) -> None:
    """A folder the method trains on and fills with generated images (DreamBooth's class
    images): a folder, whose images are readable; a bad one would count toward the images
    wanted, and be found only after the missing ones were generated."""
    for key, value in config.method.image_folders().items():
        folder, data = Path(value), Path(config.data.path)
        if data.exists() and (within(folder, data) or within(data, folder)):
            raise DataError(f"{key} = {value!r} and data.path {config.data.path!r} overlap: generated images would "
                            "be trained on as the data's. Give them a folder of their own.")
        if not folder.exists():
            continue
        if not folder.is_dir():
            raise DataError(f"{key} = {value!r} is a file; give a folder (images are generated into it)")
        bad = [f"{image.name} ({problem})" for image in sorted(folder.iterdir())
               if image.suffix.lower() in IMAGE_SUFFIXES and (problem := image_problem(image))]
        if bad:
            raise DataError(f"{key} {value!r} holds {len(bad)} file(s) that are not readable images: "
                            f"{'; '.join(bad[:5])}. Remove them (missing images are generated again).")


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


def finished_message(plan: RunPlan) -> str:
    """What `train` does with a run that finished before (nothing), and where its result
    is; a max_steps below the finished step is named, since the run is not cut back."""
    assert plan.finished_at is not None
    text = (f"this run finished at step {plan.finished_at}: its result is {plan.run_dir / 'final'}. "
            "Nothing was trained or changed.")
    asked = plan.config.train.max_steps
    if asked is None or asked >= plan.finished_at:
        return text + " To train longer, raise train.max_steps; for a new run, give another train.output_dir."
    return (text + f" train.max_steps = {asked} is below that, and a finished run is not cut back "
            f"({_kept_at(plan.run_dir, asked)}); for a {asked}-step result, start a new run in another "
            "train.output_dir.")


def _kept_at(run_dir: Path, step: int) -> str:
    """What the run keeps of an earlier step: the result of a run that finished there
    before it was trained on (final-step-N), and that step's checkpoint."""
    kept = []
    if RunDir(run_dir).kept_final(step).is_dir():
        kept.append(f"its earlier result {RunDir(run_dir).kept_final(step)} is the {step}-step one")
    checkpoint = checkpoint_dir(run_dir, step)
    if (checkpoint / MARKER).is_file():
        kept.append(f"its checkpoint {checkpoint} holds the weights of step {step}")
    return "; ".join(kept) or f"no checkpoint of step {step} is kept"


def _reached(config: RunConfig, recorded: dict[str, Any] | None, finished: int) -> bool:
    """Whether the config asks for no more steps than the finished run made."""
    if config.train.max_steps is not None:
        return config.train.max_steps <= finished
    before = (recorded or {}).get("train", {})
    return before.get("max_steps") is None and config.train.epochs <= before.get("epochs", 1)


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
