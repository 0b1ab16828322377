"""`difftune generate`'s request and its checks: `plan_generation` checks every argument
and fills in what a run directory knows (its base, resolution, guidance and steps) before
anything heavy is imported; generate.py then loads and renders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from difftune.errors import InputError
from difftune.extras import require_quantizer
from difftune.paths import (
    check_controlnet_fits,
    check_finished_run,
    check_model_folder,
    check_not_an_input,
    check_output_file,
    check_pipeline,
)
from difftune.rundir import model_source, run_config
from difftune.trained_inputs import check_embedding, check_lora, check_run_result, is_control_run, is_edit_run

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MAX_STEPS = 1000


@dataclass(frozen=True)
class Generation:
    """One image to render, every argument checked."""

    base: str
    prompt: str
    out: Path
    controlnet: str | None = None
    image: str | None = None
    lora: str | None = None
    lora_scale: float = 1.0
    embedding: str | None = None
    """A textual-inversion result (its run directory or final/)."""
    steps: int = 20
    seed: int = 0
    guidance_scale: float = 7.5
    conditioning_scale: float = 1.0
    negative_prompt: str | None = None
    resolution: int | None = None
    family: str | None = None
    """The base's family: given, the run's, or read from the base's model_index.json."""
    quantize: str | None = None
    """Hold the denoiser and text encoders in "nf4" or "int8" (bitsandbytes)."""
    control: bool = False
    """A channel-concat Control result (its pipeline takes --image): a Control run given
    as --base, or a Control-LoRA run as --lora."""
    edit: bool = False
    """An edit result (its pipeline takes --image as the reference): an edit run given as
    --base, or its LoRA as --lora."""
    scheduler: str | None = None
    """The scheduler class to sample with in place of the family's sampler: the run's
    validation.scheduler, or a step-distilled base's own (sampling.py)."""
    notes: tuple[str, ...] = ()
    """What was taken from a run directory, to say so."""
    from_run: frozenset[str] = frozenset()
    """The settings taken from a run directory."""


def plan_generation(request: Generation, given: set[str], overwrite: bool = False) -> Generation:
    """Check every argument (before torch is imported); settings not `given` on the
    command line come from the run directory of --controlnet, --lora or --base, if any."""
    _check_numbers(request)
    check_output_file("--out", str(request.out), IMAGE_SUFFIXES, overwrite)
    if request.quantize is not None:
        require_quantizer(request.quantize, "--quantize")
    request = replace(request, control=any(is_control_run(value) for value in (request.base, request.lora)),
                      edit=any(is_edit_run(value) for value in (request.base, request.lora)))
    if request.controlnet is not None and request.image is None:
        raise InputError("--controlnet needs --image (the conditioning image)")
    if request.image is not None and request.controlnet is None and not request.control and not request.edit:
        raise InputError("--image is for a ControlNet (--controlnet), a Control run or an edit run (as --base, "
                         "or its LoRA as --lora)")
    if request.control and request.image is None:
        raise InputError("a Control model needs --image (the conditioning image its latents are made from)")
    for flag, value in (("--controlnet", request.controlnet), ("--lora", request.lora), ("--base", request.base),
                        ("--embedding", request.embedding)):
        check_run_result(flag, value)
    if request.controlnet is not None:
        check_model_folder("--controlnet", request.controlnet, "ControlNet")
    if request.lora is not None:
        check_lora(request.lora)
    if request.embedding is not None:
        check_embedding(request.embedding)
    base_key = "--base" if request.base else "--base (the run's model.pretrained)"
    trained = request.controlnet or request.lora or request.embedding
    if trained is not None and run_config(trained) is not None:
        request = _from_run(request, run_config(trained), given)  # its base, size, guidance, steps
    elif request.base and run_config(request.base) is not None:
        request = _from_run(request, run_config(request.base), given | {"base"})  # a full fine-tune
    if not request.base:
        raise InputError("--base is needed: the base pipeline (Hub id or folder); it can be left out only when "
                         "--controlnet or --lora is a difftune run directory, which records its base")
    check_finished_run(base_key, request.base)
    base_folder = Path(model_source(request.base))
    if run_config(request.base) is not None and not (base_folder / "model_index.json").is_file():
        raise InputError(f"--base {request.base!r} is a run whose result is not a whole pipeline (a ControlNet "
                         "or a LoRA): give it as --controlnet or --lora, and its base as --base")
    request = _with_base_sampling(_with_family(request), given)
    from difftune.families import check_base

    check_pipeline(base_key, model_source(request.base), request_family(request).components)
    check_base(base_key, model_source(request.base), request_family(request).name, "--family (or the run's model.family)")
    _check_lora_family(request)
    _check_family_takes(request, given)
    if request.controlnet is not None:
        check_controlnet_fits("--controlnet", request.controlnet, model_source(request.base),
                              request_family(request).denoiser_name)
    if request.image is not None:
        _check_image(request.image)
    _check_size(request, given)
    folders = {"--base": request.base, "--controlnet": request.controlnet, "--lora": request.lora,
               "--embedding": request.embedding}
    check_not_an_input("--out", request.out, {"--image": request.image} | {  # a run's final/, not the run
        flag: model_source(value) for flag, value in folders.items() if value})
    return request


def _check_numbers(request: Generation) -> None:
    if request.scheduler is not None:
        from difftune.sampling import is_scheduler_class

        if not is_scheduler_class(request.scheduler):
            raise InputError(f"--scheduler {request.scheduler!r} is not a diffusers scheduler class (such as "
                             "EulerAncestralDiscreteScheduler, LCMScheduler, UniPCMultistepScheduler)")
    if not 1 <= request.steps <= MAX_STEPS:
        raise InputError(f"--steps must be between 1 and {MAX_STEPS} (got {request.steps})")
    for flag, value in (("--guidance-scale", request.guidance_scale), ("--lora-scale", request.lora_scale),
                        ("--conditioning-scale", request.conditioning_scale)):
        if not math.isfinite(value) or value < 0 or value > 100:
            raise InputError(f"{flag} must be a number from 0 to 100 (got {value})")
    if not 0 <= request.seed < 2**63:
        raise InputError(f"--seed must be between 0 and 2^63 - 1 (got {request.seed})")
    if request.resolution is not None and (request.resolution <= 0 or request.resolution % 8 or request.resolution > 8192):
        raise InputError(f"--resolution must be a positive multiple of 8 up to 8192 (got {request.resolution})")
    if not request.prompt.strip():
        raise InputError("--prompt is empty")


def _from_run(request: Generation, run: dict[str, Any] | None, given: set[str]) -> Generation:
    if run is None:
        return request
    taken = {
        "family": run.get("model", {}).get("family", "sd"),
        "base": run.get("model", {}).get("pretrained"),
        "resolution": run.get("data", {}).get("resolution"),
        "guidance_scale": run.get("validation", {}).get("guidance_scale"),
        "steps": run.get("validation", {}).get("steps"),
        "scheduler": run.get("validation", {}).get("scheduler"),
    }
    taken = {k: v for k, v in taken.items() if v is not None and k not in given}
    if request.family is not None:  # --family given
        taken.pop("family", None)
    if request.base:  # --base given: the user's base, and its family unless --family says
        taken.pop("base", None)
        taken.pop("family", None)
    notes = tuple(f"{key.replace('_', ' ')} {value} (from the run)" for key, value in taken.items()
                  if key != "family")
    return replace(request, **taken, notes=request.notes + notes, from_run=request.from_run | set(taken))


def _with_base_sampling(request: Generation, given: set[str]) -> Generation:
    """A step-distilled base's own steps, guidance and scheduler (sampling.py) where neither
    the command line nor the run set them."""
    from difftune.sampling import read_base_sampling

    sampling = read_base_sampling(model_source(request.base))
    if not sampling.distilled:
        return request
    settled = given | request.from_run
    wanted = {"steps": sampling.steps, "guidance_scale": sampling.guidance_scale, "scheduler": sampling.scheduler}
    taken = {key: value for key, value in wanted.items() if key not in settled}
    if not taken:
        return request
    said = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in taken.items())
    return replace(request, **taken, notes=request.notes + (f"{said} (the base is {sampling.describe()})",))


def _with_family(request: Generation) -> Generation:
    """The family from --family or the run; else the base's model_index.json says (a Hub
    id that is not local: "sd")."""
    from difftune.families import families, family_of_pipeline

    if request.family is not None:
        if request.family not in families():
            raise InputError(f"--family {request.family!r} is unknown; difftune has {', '.join(sorted(families()))}")
        return request
    found = family_of_pipeline(Path(model_source(request.base)).expanduser())
    return replace(request, family=found.name if found is not None else "sd")


def request_family(request: Generation) -> Any:
    from difftune.families import get_family

    return get_family(request.family or "sd")


def _check_lora_family(request: Generation) -> None:
    """A LoRA or embedding run of another family than the base (an SDXL LoRA on an SD base)."""
    for flag, value in (("--lora", request.lora), ("--embedding", request.embedding)):
        run = run_config(value)
        family = (run or {}).get("model", {}).get("family", "sd")
        if run is not None and family != request.family:
            raise InputError(f"{flag} {value} was trained on a {family!r} base, and --base {request.base} is "
                             f"{request.family!r}: give a base of its family")


def _check_family_takes(request: Generation, given: set[str]) -> None:
    """Flags the family's pipeline would ignore (or refuse after loading) are refused here."""
    family = request_family(request)
    if request.negative_prompt is not None and not family.negative_prompt:
        raise InputError(f"--negative-prompt: {family.description} is guidance-distilled, and its pipelines use no "
                         "negative prompt as difftune generate runs them; leave it out")
    if "conditioning_scale" in given and request.controlnet is None:
        raise InputError("--conditioning-scale is the strength of a ControlNet (--controlnet); "
                         f"{'a Control model' if request.control else 'this generation'} has none")
    if "lora_scale" in given and request.lora is None:
        raise InputError("--lora-scale is the strength of a LoRA (--lora), and none is given")
    if "lora_scale" in given and request.control and not reads_lora(family):
        raise InputError(f"--lora-scale: {family.pipeline_classes['control']} reads no LoRA, so this Control-LoRA "
                         "runs as the transformer its run fused (final/"
                         f"{family.denoiser_name}/), whose strength is fixed; leave --lora-scale out")


def _check_size(request: Generation, given: set[str]) -> None:
    """The size the image is rendered at (--resolution, the run's data.resolution, the base's
    native size, or the --image's own) fits the base's VAE and denoiser (families.limits)."""
    from difftune.families import check_sizes_fit

    base = model_source(request.base)
    key = "--resolution" if "resolution" in given else "--resolution (the run's data.resolution)"
    sizes = {key: request.resolution} if request.resolution else {}
    native = native_resolution(Path(base).expanduser(), request_family(request).denoiser_name)
    if not sizes and request.image is not None and native is None:
        from PIL import Image

        from difftune.data.images import oriented_size

        with Image.open(request.image) as image:  # upright, as _conditioning turns it
            width, height = oriented_size(image)
        sizes = {f"--image {request.image}'s width": width, f"--image {request.image}'s height": height}
    check_sizes_fit(sizes, request_family(request), base)


def _check_image(path: str | None) -> None:
    from difftune.data.sources import image_problem

    problem = image_problem(Path(path or ""))
    if problem:
        raise InputError(f"--image {path}: {problem}")


def reads_lora(family: Any) -> bool:
    """Whether the family's Control pipeline loads a LoRA (else a Control-LoRA runs fused)."""
    return hasattr(family.pipeline_class("control"), "load_lora_weights")


def native_resolution(base: Path, denoiser: str = "unet") -> int | None:
    """The base's own image size: the denoiser's sample_size times the VAE's downsampling,
    from the configs (None when they are not local)."""
    import json

    try:
        unet = json.loads((base / denoiser / "config.json").read_text())
        vae = json.loads((base / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None
