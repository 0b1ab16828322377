"""Inference with trained weights: a ControlNet, a LoRA (or LoKr, LoHa), a textual-inversion
embedding, or a full fine-tune's pipeline; each run's result loads through its
results.Result, as its model card says. The request comes checked from
generation_plan.plan_generation (before torch is imported); `generate` loads and renders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from difftune.errors import InputError
from difftune.generation_plan import Generation, native_resolution, reads_lora, request_family
from difftune.results import RESULTS
from difftune.rundir import model_source
from difftune.trained_inputs import attached_result


def _sampler(request: Generation, family: Any, scheduler: Any) -> Any:
    """The family's sampler, or the scheduler the request names (the run's or a distilled
    base's), made from the pipeline's own scheduler config whatever its class."""
    if request.scheduler is None:
        return family.sampler(scheduler)
    from difftune.sampling import scheduler_named

    return scheduler_named(request.scheduler, scheduler.config)


def generate(request: Generation, should_stop: Callable[[], bool] = lambda: False) -> Path:
    """Render one image with the family's sampler (UniPC for SD/SDXL) in its half precision
    on a GPU (fp16, Flux bf16), the conditioning image resized to the
    resolution (the run's, or the base's native size). A stop request (`should_stop`,
    a first Ctrl+C) ends it after loading or between denoising steps."""
    import torch

    from difftune.heap import keep_freed_memory
    from difftune.quiet import quiet_loading_bars

    keep_freed_memory()  # each denoising step frees and allocates the same large blocks
    quiet_loading_bars()
    accelerator = torch.accelerator.current_accelerator()  # CUDA, XPU, MPS...; None on a CPU
    device = accelerator.type if accelerator is not None else "cpu"
    family = request_family(request)
    pipe = _load_pipeline(request, getattr(torch, family.gpu_dtype) if device != "cpu" else torch.float32)
    call = _call_arguments(request, family, pipe)
    pipe = pipe.to(device)
    if request.quantize is not None:
        from difftune.quantization import quantize_pipeline

        quantize_pipeline(pipe, family.denoiser_name, request.quantize, pipe.dtype)
    pipe.scheduler = _sampler(request, family, pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)

    def stop_between_steps(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if should_stop():
            raise KeyboardInterrupt
        return tensors

    if should_stop():
        raise KeyboardInterrupt
    result = pipe(
        prompt=request.prompt,  # by name: an edit pipeline takes `image` first
        num_inference_steps=request.steps,
        generator=torch.Generator(device).manual_seed(request.seed),
        callback_on_step_end=stop_between_steps,
        # --negative-prompt (in call) in place of the family's own
        **(family.guidance_arguments(pipe, request.guidance_scale, 1) | family.generation_options(pipe) | call),
    ).images[0]
    out_path = request.out
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(f".{out_path.name}.partial")
    result.save(partial, format=_format(out_path))
    partial.replace(out_path)
    return out_path


def _call_arguments(request: Generation, family: Any, pipe: Any) -> dict[str, Any]:
    """The pipeline call's own arguments: the size, the conditioning or edited image, the
    ControlNet and LoRA scales and the negative prompt, as the request gives them."""
    size = request.resolution or native_resolution(Path(model_source(request.base)), family.denoiser_name)
    call: dict[str, Any] = {"height": size, "width": size} if size else {}
    if request.image is not None:
        control = _conditioning(request.image, size)
        arguments = (family.edit_arguments(control, control.width, control.height) if request.edit
                     else family.control_arguments(control))
        call |= {**arguments, "height": control.height, "width": control.width}
    if request.controlnet is not None:
        call["controlnet_conditioning_scale"] = request.conditioning_scale
    if request.lora is not None and not (request.control and not reads_lora(family)):
        call[family.attention_options] = {"scale": request.lora_scale}  # (a fused LoRA has no scale)
    if request.negative_prompt is not None:
        import inspect

        if "negative_prompt" not in inspect.signature(pipe.__call__).parameters:
            raise InputError(f"--negative-prompt: {type(pipe).__name__} takes no negative prompt")
        call["negative_prompt"] = request.negative_prompt
    return call


def _load_pipeline(request: Generation, dtype: Any) -> Any:
    """The pipeline, with its ControlNet and LoRA; a folder diffusers cannot load (weights
    that do not fit their config, a LoRA of another base) is a message naming it."""
    import torch

    from difftune.families.base import check_weights_loaded

    family = request_family(request)
    base = model_source(request.base)
    what = f"--base {request.base}"
    try:
        net = None
        if request.controlnet is not None:
            what = f"--controlnet {request.controlnet}"
            net = family.load_controlnet(model_source(request.controlnet), dtype)
            what = f"--base {request.base}"
        parts = {}
        fused = request.lora is not None and request.control and not reads_lora(family)
        if fused:  # a Control-LoRA for a pipeline without a LoRA loader: its fused denoiser (CogView4)
            what = f"--lora {request.lora}"
            parts = {family.denoiser_name: _fused_denoiser(family, model_source(request.lora), dtype)}
            what = f"--base {request.base}"
        kind = "control" if request.control else "edit" if request.edit else None
        pipe = family.load_pipeline(base, dtype, net, kind=kind, **parts)
        if request.lora is not None and not fused:
            what = f"--lora {request.lora} (was it trained on another base?)"
            attached_result(request.lora, "lora").attach(family, pipe, Path(model_source(request.lora)))
        if request.embedding is not None:
            what = f"--embedding {request.embedding} (was it trained on another base?)"
            RESULTS["embedding"].attach(family, pipe, Path(model_source(request.embedding)))
    except Exception as error:  # noqa: BLE001 (diffusers, transformers and peft raise many kinds)
        raise InputError(f"cannot load {what}: {type(error).__name__}: {error}") from None
    modules = {name: part for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    check_weights_loaded(modules, f"--base {request.base}" + (f" or --controlnet {request.controlnet}"
                                                             if request.controlnet else ""))
    return pipe


def _fused_denoiser(family: Any, final: str, dtype: Any) -> Any:
    import diffusers

    return getattr(diffusers, family.denoiser_class).from_pretrained(final, subfolder=family.denoiser_name,
                                                                     dtype=dtype)


def _format(path: Path) -> str:
    from PIL import Image

    return Image.registered_extensions().get(path.suffix.lower(), "PNG")


def _conditioning(path: str | None, resolution: int | None) -> Any:
    from PIL import Image

    from difftune.data.images import open_oriented

    control = open_oriented(Path(path))  # type: ignore[arg-type]  # upright, as training saw its images
    if resolution is not None:
        control = control.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return control
