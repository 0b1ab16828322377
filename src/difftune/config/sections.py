"""The run configuration's sections: typed and strict.

Every section forbids unknown keys and checks types, so a typo or a wrong value is
reported (all of them at once, each with its key path) before any model loads.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from difftune.strict import NonEmpty, PathText, Section

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


_Section = Section
_S = TypeVar("_S", bound=Section)


def family_names() -> list[str]:
    """The families difftune knows (each a folder in difftune/families, listed by the catalog)."""
    from difftune.catalog import family_names as listed

    return listed()


class ModelConfig(_Section):
    family: str = "sd"
    """Model family, a folder of difftune/families: "sd" (Stable Diffusion 1.x and 2.x),
    "sdxl" (Stable Diffusion XL), "sd3" (Stable Diffusion 3 / 3.5), "flux" (FLUX.1),
    "cogview4" (CogView4)."""
    pretrained: PathText = NonEmpty
    """Hub id or local folder of the base pipeline (diffusers layout)."""
    vae: PathText | None = None
    """Another VAE (Hub id or folder of an AutoencoderKL) instead of the pipeline's own, e.g.
    an fp16-safe SDXL VAE (diffusers' --pretrained_vae_model_name_or_path)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base components."""
    variant: str | None = None
    """Weight-file variant such as "fp16"."""
    tokenizer: PathText | None = None
    """Another tokenizer (Hub id or folder) instead of the pipeline's own (the first one,
    for a family with several)."""
    guidance: float = Field(3.5, ge=0)
    """The value a guidance-distilled transformer's guidance embedding gets in training
    (Flux dev: 3.5, diffusers' --guidance_scale); a base without one ignores it."""
    quantize: Literal["nf4", "int8", "fp8"] | None = None
    """Hold the frozen denoiser and text encoders in 4 bits (NF4) or 8 bits (int8) through
    bitsandbytes, or in fp8 (e4m3, weight-only) through torchao, on the CPU or a GPU; what
    trains stays full precision. For methods that keep the base frozen: lora, controlnet,
    and control or dreambooth with [method.lora]."""

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        known = family_names()
        if value not in known:
            raise ValueError(f"unknown family {value!r}; difftune has {', '.join(map(repr, known))}")
        return value


class ObjectiveConfig(_Section):
    """Loss options shared by every method."""

    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """What the denoiser predicts; None follows the base scheduler's config."""
    snr_gamma: float | None = Field(None, gt=0, le=1000)
    """Min-SNR loss weighting (Hang et al. 2023); 5.0 is the paper's value."""
    noise_offset: float = Field(0.0, ge=0.0, le=1.0)
    """Add offset * N(0, 1) per sample and channel to the noise (darker darks, brighter brights)."""
    input_perturbation: float = Field(0.0, ge=0.0, le=1.0)
    """Perturb the noise that makes the input, not the target (Ning et al. 2023); 0.1 is typical."""
    # Flow-matching families (Flux, CogView4); the DDPM families refuse them at config load.
    timestep_sampling: Literal["uniform", "logit_normal", "mode", "cosmap"] = "uniform"
    """How flow matching draws each sample's time before the shift (Esser et al. 2024, sec. 3.1):
    uniform, logit-normal (logit_mean, logit_std), mode (mode_scale) or cosmap."""
    logit_mean: float = 0.0
    """Logit-normal sampling (timestep_sampling = "logit_normal"): the mean of the normal
    whose sigmoid is the time; 0.0 centres the times on 0.5, a negative mean favours
    less noise."""
    logit_std: float = Field(1.0, gt=0)
    """Logit-normal sampling: the normal's standard deviation (smaller: times closer to
    the centre)."""
    mode_scale: float = 1.29
    """Mode sampling (timestep_sampling = "mode"): the scale s in
    t = 1 - u - s (cos^2(pi u / 2) - 1 + u) for a uniform u; 0 is uniform, a larger s puts
    more times near the middle (1.29 is the default of diffusers' scripts)."""
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    """Flow matching's per-sample loss weight: none, sigma^-2 or cosmap (Esser et al. 2024)."""


# Options that only one kind of objective reads: the config refuses the others' (config/run.py).
FLOW_ONLY = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "loss_weighting")
DDPM_ONLY = ("prediction_type", "snr_gamma", "input_perturbation")
OBJECTIVE_OPTIONS = {"flow_matching": FLOW_ONLY, "ddpm": DDPM_ONLY}


class DataConfig(_Section):
    path: PathText = NonEmpty
    """Local folder (imagefolder with metadata.jsonl, parquet, arrow) or Hub dataset name."""
    config_name: str | None = None
    """Dataset configuration name passed to datasets.load_dataset."""
    split: str = "train"
    """Dataset split to train on (datasets.load_dataset's split, or one split of a
    save_to_disk DatasetDict); a folder of images with .txt captions has no splits."""
    image_column: str = "image"
    """Target image column; in a metadata.jsonl folder this is the file_name column."""
    conditioning_image_column: str = "conditioning_image"
    """Control image column; in a metadata.jsonl folder, paths relative to the folder."""
    reference_image_column: str = "reference_image"
    """Reference image column of an edit run (method kind "edit"): one image, a list of
    images (several references), or empty (the row trains as text-to-image); in a
    metadata.jsonl folder, paths relative to the folder; in streamed webdataset shards,
    a member's name ("reference.png": one reference, which a sample may lack)."""
    caption_column: str = "text"
    """Caption column (a string, or a list of strings of which one is drawn)."""
    resolution: int = Field(512, gt=0, le=8192)
    """Square training size in pixels; divisible by 8."""
    center_crop: bool = True
    """Crop the centre after resizing the shorter side; False crops at a random place."""
    random_flip: bool = False
    """Flip image and conditioning together, horizontally, with probability 0.5."""
    proportion_empty_prompts: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of captions replaced by "" (classifier-free guidance dropout)."""
    max_samples: int | None = Field(None, gt=0)
    """Keep only this many samples (shuffled with the seed first), for debugging. With
    streaming: the samples an epoch (required)."""
    streaming: bool = False
    """Read the dataset as a stream (Hub, webdataset .tar shards, parquet) instead of
    downloading and checking it whole; each process reads its own share. Needs
    max_samples; not with the caches, buckets or loader workers."""
    shuffle_buffer: int = Field(1000, gt=0)
    """With streaming: rows shuffled within a buffer of this many (seeded by the epoch)."""
    buckets: bool = False
    """Aspect-ratio buckets: each image trains near its own shape, at about resolution^2
    pixels, every batch from one bucket (instead of a square crop)."""
    bucket_step: int = Field(64, gt=0)
    """Bucket sides are multiples of this (a multiple of 8)."""
    bucket_max_aspect: float = Field(2.0, ge=1.0, le=16.0)
    """Longest side over shortest side, at most."""
    bucket_no_upscale: bool = False
    """Put an image only in buckets it covers (no upscaling), where one exists."""
    on_bad: Literal["error", "skip"] = "error"
    """A row with a file that cannot be trained on (missing, empty, unreadable, truncated,
    image and conditioning of different sizes, bad caption): stop with the list, or skip
    those rows and log each one. `difftune data check` gives the full report."""
    num_workers: int | None = Field(None, ge=0)
    """DataLoader worker processes; unset: none on the CPU, where workers only take cores
    from torch (0, 1, 2 workers: 146, 143, 145 samples/s on the CPU benchmark), up to 8
    per GPU (see training.setup.loader_workers)."""
    cache_dir: PathText | None = None
    """Where datasets caches downloads."""
    cache_latents: bool | None = None
    """Encode every image with the VAE once (both flips with random_flip) and train from
    the cached latents; needs center_crop. Keyed on everything that changes them. Unset:
    on when the run sees each sample at least twice (four times with random_flip) and
    nothing makes the cache stale; the run says which and why."""
    cache_text: bool | None = None
    """Encode every distinct caption (and "") once; not with a trained text encoder.
    Unset: on when the run sees each sample at least twice and the embeddings stay fixed."""
    encoded_cache_dir: PathText | None = None
    """Where cached latents and embeddings live; default ~/.cache/difftune/encoded
    (or $DIFFTUNE_CACHE/encoded)."""

    @model_validator(mode="after")
    def _latent_cache_needs_fixed_crop(self) -> DataConfig:
        if self.cache_latents is True and not self.center_crop:
            raise ValueError("cache_latents needs center_crop = true (a random crop changes every epoch)")
        return self

    @model_validator(mode="after")
    def _streaming_reads_once(self) -> DataConfig:
        if not self.streaming:
            return self
        if self.max_samples is None:
            raise ValueError("streaming needs max_samples: the samples an epoch (a stream's length is unknown, "
                             "and the step count and learning-rate schedule need one)")
        clashes = [key for key, on in (("cache_latents", self.cache_latents is True),
                                       ("cache_text", self.cache_text is True),
                                       ("buckets", self.buckets), ("num_workers", bool(self.num_workers))) if on]
        if clashes:
            raise ValueError(f"streaming reads each row as it trains; it cannot be used with {', '.join(clashes)} "
                             "(they need the whole dataset ahead, or split the stream again)")
        return self

    @field_validator("bucket_step")
    @classmethod
    def _step_divisible_by_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be divisible by 8 (got {value})")
        return value

    @field_validator("resolution")
    @classmethod
    def _divisible_by_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be divisible by 8 (got {value})")
        return value


class TrainConfig(_Section):
    output_dir: PathText = NonEmpty
    """Run directory: config, events, logs, checkpoints, validation, final weights."""
    seed: int = Field(0, ge=0, lt=2**32)
    """Seeds accelerate's set_seed, the data order and max_samples subset, augmentation
    and noise, so a resumed run sees the same batches; also the default validation.seed."""
    batch_size: int = Field(4, gt=0, le=65536)
    """Per-device batch size."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step: each step sees batch_size x this x processes
    samples."""
    max_steps: int | None = Field(None, gt=0, le=10**9)
    """Optimizer steps; overrides epochs when set."""
    epochs: int = Field(1, gt=0, le=10**6)
    """Passes over the data when max_steps is unset."""
    learning_rate: float = Field(5e-6, gt=0, le=1.0)
    """Peak learning rate (after warmup; scaled by scale_lr)."""
    scale_lr: bool = False
    """Multiply the LR by batch size x accumulation x processes."""
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"  # type: ignore[valid-type]
    """Learning-rate schedule over the run's optimizer steps, built by
    diffusers.optimization.get_scheduler (as diffusers' training scripts)."""
    lr_warmup_steps: int = Field(500, ge=0)
    """Warmup length in optimizer steps. The plain "constant" schedule has no warmup, so
    with the default schedule this is ignored."""
    lr_num_cycles: int = Field(1, gt=0)
    """Number of hard restarts of "cosine_with_restarts"; the other schedules ignore it."""
    lr_power: float = Field(1.0, gt=0)
    """Power of the "polynomial" decay (1.0: linear); the other schedules ignore it."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1: decay of the running mean of the gradients."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """AdamW beta2: decay of the running mean of the squared gradients."""
    adam_weight_decay: float = Field(1e-2, ge=0, le=1.0)
    """AdamW's decoupled weight decay, on every trained parameter."""
    adam_epsilon: float = Field(1e-8, gt=0)
    """AdamW epsilon, added to the denominator for numerical stability."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Clip the gradients' total norm to this, on steps where gradients sync (the end of
    an accumulation window)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Compute precision. Frozen weights are cast to it; what trains (a whole module, or
    the adapters in one) stays fp32 under autocast. "fp16" needs a GPU, and families
    whose activations overflow fp16 (CogView4, Qwen-Image) refuse it."""
    gradient_checkpointing: bool = False
    """Gradient checkpointing on the modules that train: activations recomputed in the
    backward pass instead of kept. For an SD1.5 ControlNet at 512 px, batch 2, fp32, it
    saved 1.1 GB (benchmarks/memory/)."""
    use_8bit_adam: bool = False
    """bitsandbytes AdamW8bit (install difftune[bnb]; 0.48 or later also runs on the CPU).
    Its state is 2.04 bytes per parameter against AdamW's 8: 0.74 GB instead of 2.89 GB
    for an SD1.5 ControlNet (benchmarks/memory/). The trained modules stay contiguous,
    because bitsandbytes' step undoes channels_last."""
    set_grads_to_none: bool = False
    """Clear gradients with `optimizer.zero_grad(set_to_none=True)` (freed, not zeroed)."""
    allow_tf32: bool = False
    """Allow TF32 in CUDA matmuls and cuDNN convolutions; without a CUDA GPU it does
    nothing."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """"sdpa" keeps diffusers' default attention (torch's scaled_dot_product_attention);
    "xformers" turns on xFormers' memory-efficient attention in the denoiser and the
    trained modules (needs xformers installed)."""
    channels_last: bool = True
    """Denoiser and trained modules in channels_last memory format (conv-heavy models run
    faster so: a step of the CPU benchmark took 30-37 ms, 48.6 ms without;
    benchmarks/README.md). On the CPU the denoiser is then read into memory instead of
    mapped from its file: a mapping would stay resident beside the converted copies
    (+3.7 GB for SD1.5)."""
    cpu_threads: Literal["auto"] | Annotated[int, Field(gt=0, le=4096)] = "auto"
    """Intra-op threads on the CPU. "auto": as many as cores, fewer while other processes
    keep cores busy (a spinning thread waiting for a descheduled one stalls every step);
    a number fixes it. A launch that sets OMP_NUM_THREADS, or an accelerator, is left alone."""
    keep_freed_memory: bool = True
    """Tell glibc's malloc to keep freed memory for the next step instead of unmapping it
    (difftune/heap.py): the Qwen-Image-Edit fill-circles preset steps 1.58x faster on the
    2-core CPU box (the LCM preset 1.11x), for about 3 GB more peak memory (13.6 against
    10.3 GB; docs/guides/caching.md). Left alone where the launch sets MALLOC_* or
    GLIBC_TUNABLES, or preloads another allocator."""
    compile: bool = False
    """torch.compile the denoiser and trained modules (in place): faster steps after a
    compile of a minute or more at the start (87 s on the CPU benchmark box), and again
    for new shapes (validation). In two cached runs of the CPU benchmark it gained 4% and
    27% (211 against 202, 225 against 177 samples/s). Off by default: on short runs the
    compile costs more than it saves; not yet measured on a GPU."""
    checkpoint_every: int = Field(500, gt=0)
    """Save a checkpoint every N optimizer steps (what resume continues from)."""
    checkpoints_total_limit: int | None = Field(None, gt=0)
    """Keep at most N complete checkpoints; older ones are pruned only after a new one is
    complete. Unset: keep all."""
    resume: PathText | None = Field(None, min_length=1)
    """"latest" or a checkpoint folder to continue from."""
    report_to: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"
    """Trackers: "tensorboard" (under the run's logs/), "wandb" (needs difftune[wandb]),
    "all" both, "none" neither; events.jsonl is written either way."""
    max_nonfinite_steps: int = Field(10, ge=0)
    """Optimizer steps in a row with a NaN/inf loss (each skipped) before the run stops."""
    log_every: int = Field(1, gt=0)
    """Write an events.jsonl line every N optimizer steps."""
    tracker_project_name: str = Field("difftune", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    """Project name for the trackers: letters, digits, ".", "_" and "-" (it names a folder
    under the run's logs/, so no path separators)."""
