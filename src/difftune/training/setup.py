"""Everything before the first step: checks, accelerator, models, data, optimizer."""

from __future__ import annotations

import contextlib
import difflib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    InitProcessGroupKwargs,
    ProjectConfiguration,
    is_torch_xla_available,
    set_seed,
)
from torch.utils.data import DataLoader, Dataset

from difftune.config import ConfigError, RunConfig, to_toml
from difftune.data.buckets import BucketBatchSampler
from difftune.data.cache import Processes, build_cache
from difftune.data.rows import CheckedRows
from difftune.data.samples import EpochSampler
from difftune.data.streaming import StreamingSamples
from difftune.data.training import open_training_data
from difftune.extras import MissingExtra, require_bitsandbytes, require_quantizer
from difftune.families import Family, Parts, get_family
from difftune.methods import make_method
from difftune.methods.base import Method, Trained
from difftune.paths import default_cache_dir
from difftune.processes import agreed
from difftune.rundir import RunDir
from difftune.scoring import MetricSet, load_metric_set
from difftune.training.cache_choice import choose_caches
from difftune.training.engines import EngineError, check_fsdp_version, fsdp_requested, switch_cpu_job_to_fsdp2
from difftune.training.source_checks import reference_limit
from difftune.validation import ValidationPair, load_validation_pairs
from difftune.versions import problems_for

TRACKERS = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}
ADAPTER_TENSORS = ("lora_", "lokr_", "hada_")
"""Names of peft adapter weights (LoRA and DoRA, LoKr, LoHa)."""


@dataclass
class Preflight:
    """What is known to be sound before any model loads."""

    family: Family
    method: Method
    samples: Dataset
    validation_pairs: list[ValidationPair]
    metric_set: MetricSet | None
    cache_notes: tuple[str, ...] = ()
    """How the caches left unset were chosen (training/cache_choice.py)."""

def preflight(config: RunConfig, rows: CheckedRows | None = None) -> Preflight:
    """Check pairing, versions, extras, precision, data, validation images; load no model.
    (Paths, the run directory and the checkpoint are checked before: training.plan.)"""
    family = get_family(config.model.family)  # the config checked that it trains this method
    method = make_method(config.method)
    broken = problems_for(config)
    if broken:
        raise ConfigError(broken, "the installed packages")
    check_extras(config)
    check_precision(config)
    check_launch(config)
    check_lora_targets(config, family)
    limit = reference_limit(config, family) if config.method.takes_references else None
    samples = open_training_data(config.data, config.train.seed, method.needs_conditioning,
                                 method.fixed_caption, rows, config.method.takes_references, limit)
    if config.method.takes_references:
        samples.reference_size = family.reference_size
    # an edit's references as they are: the family's edit_arguments (or its pipeline) sizes them as training did
    pairs = load_validation_pairs(config.validation, None if config.method.takes_references else config.data.resolution)
    caches = choose_caches(config, len(samples), family, samples)
    return Preflight(family, method, samples, pairs, load_metric_set(config), caches.notes)


def with_sampler(parts: Parts, config: RunConfig) -> Parts:
    """The parts sampling with validation.scheduler where it is set (a step-distilled base's
    own, settled from its scheduler config, or the config's choice), made from the base's
    scheduler config as written (the training scheduler keeps only its own class's keys)."""
    from dataclasses import replace

    from difftune.model_files import read_config
    from difftune.sampling import scheduler_named

    name = config.validation.scheduler
    if name is None:
        return parts
    model = config.model
    written = read_config(model.pretrained, "scheduler/scheduler_config.json", model.revision)
    return replace(parts, sampler=scheduler_named(name, written or parts.noise_scheduler.config))


def check_precision(config: RunConfig) -> None:
    """fp16 mixed precision needs a GPU (accelerate refuses it on the CPU, deep inside)."""
    if config.train.mixed_precision == "fp16" and torch.accelerator.current_accelerator() is None:
        raise ConfigError(['train.mixed_precision = "fp16" needs a GPU, and none is available here: '
                           'use "bf16" or "no" on the CPU'])


def sharded_launch() -> str | None:
    """The engine that will shard the trained weights, as the launcher's environment says
    before the accelerator exists: "FSDP2" (accelerate turns FSDP on for several processes
    only), "DeepSpeed ZeRO-3", or None."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if fsdp_requested() and processes > 1:
        return "FSDP2"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes") and \
            os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def check_launch(config: RunConfig) -> None:
    """What a sharded launch cannot train, refused before any model loads (the engine
    would find it only after loading: training.engines)."""
    engine = sharded_launch()
    if engine is None:
        return
    if config.model.quantize:
        raise EngineError(f"model.quantize = {config.model.quantize!r} under {engine}: a quantized base is not "
                          "sharded by difftune; launch with DDP (configs/accelerate/ddp.yaml) or one process, or "
                          "leave model.quantize unset")
    if config.method.trains_text_encoder:
        raise EngineError(f"method {config.method.kind!r} trains the text encoders (method.train_text_encoder, or "
                          f"its own kind) under {engine}: a sharded launch trains one module per run (accelerate "
                          "prepares one model with its optimizer); leave it off, or launch with DDP "
                          "(configs/accelerate/ddp.yaml)")


def check_lora_targets(config: RunConfig, family: Family) -> None:
    """Every LoRA target names a module of the part it adapts, checked on the base's
    skeleton (families.limits; no weights): peft drops a target that matches nothing."""
    from difftune.families.limits import part_module_names, unmatched_targets

    settings, model = config.method.lora if config.method.uses_lora else None, config.model
    if settings is None:
        return
    wanted = {family.denoiser_name: ("method.lora.target_modules", settings.target_modules or family.lora_targets)}
    if config.method.trains_text_encoder:
        trainable = family.trainable_text_encoder_names or family.text_encoder_names
        wanted |= dict.fromkeys(trainable, ("method.lora.text_encoder_target_modules",
                                            settings.text_encoder_target_modules))
    for part, (key, targets) in wanted.items():
        names = part_module_names(family, model.pretrained, part, model.revision)
        missing = unmatched_targets(targets, names) if names is not None else []
        if missing:
            ends = {".".join(name.split(".")[-depth:]) for name in names for depth in (1, 2)}
            close = difflib.get_close_matches(missing[0], ends, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError([f"{key}: {', '.join(map(repr, missing))} match no module of the base's {part}, "
                               f"so nothing would adapt there{hint}"], "the config, for this base")


def check_extras(config: RunConfig) -> None:
    if config.train.use_8bit_adam:
        require_bitsandbytes()
    if config.model.quantize:
        require_quantizer(config.model.quantize, "model.quantize")
    if config.train.attention == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise MissingExtra('train.attention = "xformers" needs xformers: pip install xformers') from None
    if "wandb" in TRACKERS[config.train.report_to]:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise MissingExtra(f"train.report_to = {config.train.report_to!r} needs wandb: pip install 'difftune[wandb]'") from None


def make_accelerator(config: RunConfig) -> Accelerator:
    run_dir = Path(config.train.output_dir)
    # accelerate keeps mixed precision in a process-wide singleton; forget the last run's
    # so several runs can share one Python process (notebooks, tests). The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    check_fsdp_version()
    accelerator = Accelerator(
        # Without an accelerator, say so: only then does accelerate run several CPU
        # processes (torchrun, mpirun) as one gloo job instead of N separate runs.
        # A TPU is no torch.accelerator: accelerate finds it through torch_xla.
        cpu=torch.accelerator.current_accelerator() is None and not is_torch_xla_available(),
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        mixed_precision=config.train.mixed_precision,
        log_with=TRACKERS[config.train.report_to] or None,
        # Other ranks wait at a barrier while rank 0 validates; NCCL's default 10 min is short.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    if config.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    switch_cpu_job_to_fsdp2(accelerator)
    set_seed(config.train.seed, device_specific=True)
    return accelerator


def write_run_config(config: RunConfig, accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        run_dir = Path(config.train.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        RunDir(run_dir).config_file.write_text(to_toml(config))


def compute_dtype(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def place_frozen_parts(parts: Parts, accelerator: Accelerator) -> None:
    """Frozen weights live on the device in the compute dtype; weights the method trains
    (a whole part, or LoRA adapters inside one) stay fp32, as accelerate's autocast
    expects. Wholly frozen parts go to eval mode."""
    dtype = compute_dtype(accelerator)
    for module in parts.modules().values():
        module.to(accelerator.device)
        if not any(p.requires_grad for p in module.parameters()):
            module.eval()
        if dtype == torch.float32:
            continue
        for parameter in module.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(dtype)


def denoiser_in_memory(config: RunConfig, accelerator: Accelerator) -> bool:
    """Whether the denoiser's weights must be read into memory rather than mapped from
    the file. Weights loaded from safetensors are views of one file mapping, which stays
    resident while any of them is alive; channels_last then copies the conv weights
    beside it. On a GPU the move to the device drops the mapping; on the CPU nothing
    would (measured: +3.7 GB peak RSS for an SD1.5 UNet in fp32). Reading costs a
    transient second copy while loading, below the training peak."""
    return config.train.channels_last and accelerator.device.type == "cpu"


def apply_model_options(config: RunConfig, parts: Parts, trained: Trained, sharded: bool = False) -> None:
    """Memory and speed options: gradient checkpointing, channels_last, compile, xformers.
    Modules FSDP2 will shard keep contiguous weights (fully_shard refuses others)."""
    if config.train.gradient_checkpointing:
        for module in trained.values():
            if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
                module.enable_gradient_checkpointing()
            else:  # transformers models
                module.gradient_checkpointing_enable()
    speed_up = {id(m): m for m in (parts.denoiser, *trained.values())}.values()
    if config.train.channels_last:
        # bitsandbytes' 8-bit step replaces each trained parameter's data with a contiguous
        # tensor (0.50): channels_last trained weights would turn back after the first step,
        # and a resumed run, channels_last again, would compute its first step differently.
        # So those stay contiguous (a LoRA's frozen base convs keep channels_last). So do
        # adapters' conv weights: peft's DoRA views them flat, which channels_last refuses,
        # LoKr makes each forward a contiguous copy of it, and a rank-r adapter gains nothing.
        for module in speed_up:
            if not sharded:  # FSDP2 shards the trained module and a frozen denoiser
                module.to(memory_format=torch.channels_last)
        for module in trained.values():
            for name, parameter in module.named_parameters():
                adapter = any(kind in name for kind in ADAPTER_TENSORS)
                if parameter.requires_grad and parameter.dim() == 4 and (config.train.use_8bit_adam or adapter):
                    parameter.data = parameter.data.contiguous()
    if config.train.compile:
        for module in speed_up:
            module.compile()  # in place: names, state dicts and saving stay as they are
    if config.train.attention == "xformers":
        for module in {id(m): m for m in (parts.denoiser, *trained.values())}.values():
            if hasattr(module, "enable_xformers_memory_efficient_attention"):
                module.enable_xformers_memory_efficient_attention()


def quantize_frozen(config: RunConfig, parts: Parts, accelerator: Accelerator, sharded: bool, events: Any) -> None:
    """model.quantize: the frozen denoiser and text encoders in 4 or 8 bits (after they
    are placed and cast; see difftune/quantization.py)."""
    kind = config.model.quantize
    if kind is None:
        return
    if sharded:
        raise EngineError(f"model.quantize = {kind!r} under FSDP2: a quantized base is not sharded by difftune; "
                          "launch with DDP (configs/accelerate/ddp.yaml) or one process")
    from difftune.quantization import quantize_frozen_parts

    counts = quantize_frozen_parts(parts, kind, compute_dtype(accelerator), config.data.cache_text)
    events.write("quantized", quantize=kind, linear_layers=counts)


class Offloaded:
    """Frozen encoders a cache replaces, kept off the accelerator while training; the
    whole pipeline (validation) brings them back for a while."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.modules: list[torch.nn.Module] = []

    def move_off(self, modules: list[torch.nn.Module]) -> None:
        if self.device.type != "cpu":
            self.modules = [module.to("cpu") for module in modules]

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        for module in self.modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in self.modules:
                module.to("cpu")


def encoded(samples: Any, trainee: Any, config: RunConfig, accelerator: Accelerator, events: Any
            ) -> tuple[Any, Offloaded]:
    """With data.cache_latents / cache_text: encode what the cache lacks once, train from
    the cache, and take the frozen encoders it replaces off the accelerator."""
    data = config.data
    offloaded = Offloaded(accelerator.device)
    if not (data.cache_latents or data.cache_text):
        return samples, offloaded
    folder = Path(data.encoded_cache_dir).expanduser() if data.encoded_cache_dir else default_cache_dir()
    started = time.perf_counter()
    processes = Processes(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
                          lambda flag: agreed(accelerator, flag))
    cached, stats = build_cache(samples, trainee.family, trainee.parts, data.cache_latents, data.cache_text,
                                folder, config.train.batch_size, processes,
                                getattr(trainee.method, "conditioning_latents", False))
    events.write("cache", path=str(folder), seconds=round(time.perf_counter() - started, 2), **stats)
    parts = trainee.parts
    offloaded.move_off(([parts.vae] if data.cache_latents else []) + (parts.text_encoders if data.cache_text else []))
    return cached, offloaded


class OnDevice:
    """A loader's batches moved to the device (what accelerate's prepared loaders do)."""

    def __init__(self, loader: DataLoader, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[Any]:
        from accelerate.utils import send_to_device

        for batch in self.loader:
            yield send_to_device(batch, self.device)


def loader_workers(config: RunConfig, device: torch.device) -> int:
    """data.num_workers, or when unset: none on the CPU, where workers only take cores
    from torch's own threads (measured: 146, 143, 145 samples/s with 0, 1, 2); on a GPU,
    enough to decode and transform images ahead of the step, up to 8 per GPU of this
    machine, or 2 when the latents are cached (reading tensors, nothing to decode)."""
    if config.data.num_workers is not None:
        return config.data.num_workers
    if device.type == "cpu":
        return 0
    # this machine's processes: torchrun (and accelerate launch) say; else one per GPU
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(1, torch.accelerator.device_count())
    cores = len(os.sched_getaffinity(0)) // processes  # the cores this process may use
    return max(1, min(2 if config.data.cache_latents else 8, cores - 1))


def make_dataloader(
    samples: Dataset, config: RunConfig, num_processes: int, device: torch.device, process_index: int = 0
) -> tuple[DataLoader, Any]:
    """Seeded, resumable order: single samples padded to the global batch, or with
    aspect buckets whole batches of one bucket each; a stream orders itself (each
    process reads its own share: the loader is not prepared by accelerate, which
    would split it again)."""
    if isinstance(samples, StreamingSamples):
        samples.bind(process_index, num_processes, config.train.batch_size * num_processes)
        return DataLoader(samples, batch_size=config.train.batch_size, collate_fn=samples.collate), samples
    workers = loader_workers(config, device)
    common = {
        "collate_fn": samples.collate,  # type: ignore[attr-defined]
        "num_workers": workers,
        "pin_memory": device.type == "cuda",
        # Kept across epochs (the sampler runs here, so start_epoch still applies): a
        # small dataset would otherwise fork its workers again every few steps.
        "persistent_workers": workers > 0,
        # Workers' base seed from the run's seed, not the global RNG (which a resumed run
        # reaches in another state): dropout and other worker randomness replay exactly.
        "generator": torch.Generator().manual_seed(config.train.seed),
    }
    sizes = getattr(samples, "sizes", None)
    if sizes is not None:
        batches = BucketBatchSampler(sizes, config.train.seed, config.train.batch_size, num_processes)
        return DataLoader(samples, batch_sampler=batches, **common), batches
    sampler = EpochSampler(len(samples), config.train.seed, config.train.batch_size * num_processes)
    return DataLoader(samples, batch_size=config.train.batch_size, sampler=sampler, **common), sampler
