"""Checks of what a run's config names, before its run directory is created: the
models (base, tokenizer, VAE, the method's own), the data and validation sets, the Hub
login a push needs, and the folders the run writes besides its own."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from difftune.config import ConfigError, RunConfig
from difftune.data.rows import CheckedRows, check_reference_counts
from difftune.data.sources import IMAGE_SUFFIXES, ReferenceLimit, image_problem
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
from difftune.training.checkpoint import ResumeError

logger = logging.getLogger(__name__)


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
    for where, image in config.validation.listed_images():
        problem = image_problem(Path(image))
        if problem == "no such file":
            raise DataError(f"{where}: no such file {image}")
        if problem:
            raise DataError(f"{where}: {image}: {problem}")
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


def reference_limit(config: RunConfig, family: Any) -> ReferenceLimit:
    """How many references a prompt of the base's edit pipeline takes (read from the base)."""
    return ReferenceLimit(family.max_references(config.model.pretrained, config.model.revision),
                          family.pipeline_classes["edit"])


def check_edit_rows(config: RunConfig, checked: CheckedRows | None) -> None:
    """No row (of `checked`; a stream's rows are counted as they are read: data.streaming),
    and no validation prompt, has more references than the base's edit pipeline takes per
    prompt."""
    from difftune.families import get_family

    limit = reference_limit(config, get_family(config.model.family))
    if checked is not None:
        check_reference_counts(checked, limit.most, limit.pipeline)
    for index, entry in enumerate(config.validation.images):
        if isinstance(entry, list) and limit.problem(len(entry)):
            raise DataError(f"validation.images[{index}] lists {len(entry)} references, and "
                            f"{limit.pipeline} takes {limit.most} per prompt (an Edit Plus base "
                            "takes several)")
