"""Typed, strict run configuration read from TOML.

Every section forbids unknown keys and checks types, so a typo or a wrong value is
reported (all of them at once, each with its key path) before any model loads.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)


class ConfigError(ValueError):
    """One or more problems in a run configuration, each naming its key."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class ModelConfig(_Section):
    family: Literal["sd"] = "sd"
    """Model family: "sd" covers Stable Diffusion 1.x and 2.x."""
    pretrained: str
    """Hub id or local folder of the base pipeline (diffusers layout)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base components."""
    variant: str | None = None
    """Weight-file variant such as "fp16"."""
    tokenizer: str | None = None
    """Another tokenizer (Hub id or folder) instead of the pipeline's own."""


class MethodConfig(_Section):
    kind: Literal["controlnet", "full"] = "controlnet"
    """Training method: "controlnet", or "full" (every denoiser weight; a whole pipeline out)."""
    controlnet: str | None = None
    """Existing ControlNet (Hub id or folder) to continue from; None starts from the UNet."""


class DataConfig(_Section):
    path: str
    """Local folder (imagefolder with metadata.jsonl, parquet, arrow) or Hub dataset name."""
    config_name: str | None = None
    """Dataset configuration name passed to datasets.load_dataset."""
    split: str = "train"
    image_column: str = "image"
    """Target image column; in a metadata.jsonl folder this is the file_name column."""
    conditioning_image_column: str = "conditioning_image"
    """Control image column; in a metadata.jsonl folder, paths relative to the folder."""
    caption_column: str = "text"
    """Caption column (a string, or a list of strings of which one is drawn)."""
    resolution: int = Field(512, gt=0)
    """Square training size in pixels; divisible by 8."""
    center_crop: bool = True
    """Crop the centre after resizing the shorter side; False crops at a random place."""
    random_flip: bool = False
    """Flip image and conditioning together, horizontally, with probability 0.5."""
    proportion_empty_prompts: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of captions replaced by "" (classifier-free guidance dropout)."""
    max_samples: int | None = Field(None, gt=0)
    """Keep only this many samples (shuffled with the seed first), for debugging."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes."""
    cache_dir: str | None = None
    """Where datasets caches downloads."""

    @field_validator("resolution")
    @classmethod
    def _divisible_by_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be divisible by 8 (got {value})")
        return value


class TrainConfig(_Section):
    output_dir: str
    """Run directory: config, events, logs, checkpoints, validation, final weights."""
    seed: int = Field(0, ge=0, lt=2**32)
    batch_size: int = Field(4, gt=0)
    """Per-device batch size."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; overrides epochs when set."""
    epochs: int = Field(1, gt=0)
    learning_rate: float = Field(5e-6, gt=0)
    scale_lr: bool = False
    """Multiply the LR by batch size x accumulation x processes."""
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"  # type: ignore[valid-type]
    lr_warmup_steps: int = Field(500, ge=0)
    lr_num_cycles: int = Field(1, gt=0)
    lr_power: float = 1.0
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    """bitsandbytes AdamW8bit (install difftune[bnb])."""
    set_grads_to_none: bool = False
    allow_tf32: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    checkpoint_every: int = Field(500, gt=0)
    checkpoints_total_limit: int | None = Field(None, gt=0)
    resume: str | None = None
    """"latest" or a checkpoint folder to continue from."""
    report_to: Literal["tensorboard", "wandb", "all", "none"] = "tensorboard"
    max_nonfinite_steps: int = Field(10, ge=0)
    """Optimizer steps in a row with a NaN/inf loss (each skipped) before the run stops."""
    log_every: int = Field(1, gt=0)
    """Write an events.jsonl line every N optimizer steps."""
    tracker_project_name: str = "difftune"


class ValidationConfig(_Section):
    every: int = Field(100, gt=0)
    """Validate every N optimizer steps (and once at the end)."""
    prompts: list[str] = []
    images: list[str] = []
    """Conditioning image files; one for all prompts, one per prompt, or N with N prompts."""
    num_images: int = Field(4, gt=0)
    """Images generated per (prompt, conditioning image) pair."""
    steps: int = Field(20, gt=0)
    """Inference steps (UniPC)."""
    guidance_scale: float = Field(7.5, ge=0)
    seed: int | None = None
    """Generator seed; defaults to train.seed."""
    metric: Literal["none", "fill_circles", "canny"] = "none"
    """Control-fidelity metric computed at each validation (and for the uncontrolled floor)."""
    metric_data: str | None = None
    """Held-out dataset (same columns as [data]) whose conditionings and captions are scored."""
    metric_samples: int = Field(32, gt=0)
    """How many held-out rows the metric scores."""

    @model_validator(mode="after")
    def _metric_needs_data(self) -> ValidationConfig:
        if self.metric != "none" and not self.metric_data:
            raise ValueError(f"metric = {self.metric!r} needs metric_data (a held-out dataset)")
        return self

    @model_validator(mode="after")
    def _prompts_match_images(self) -> ValidationConfig:
        n_prompts, n_images = len(self.prompts), len(self.images)
        if n_images == 0:
            return self
        if n_prompts == 0:
            raise ValueError("images need prompts")
        if n_prompts != n_images and 1 not in (n_prompts, n_images):
            raise ValueError(
                f"{n_prompts} prompts and {n_images} images: give one of them once, "
                "or the same number of each"
            )
        return self

    def pairs(self) -> list[tuple[str, str | None]]:
        """(prompt, conditioning image path or None) pairs, broadcasting a single one."""
        if not self.images:
            return [(prompt, None) for prompt in self.prompts]
        count = max(len(self.prompts), len(self.images))
        prompts = self.prompts * count if len(self.prompts) == 1 else self.prompts
        images = self.images * count if len(self.images) == 1 else self.images
        return list(zip(prompts, images))


class HubConfig(_Section):
    push: bool = False
    model_id: str | None = None
    """Repository id; defaults to the output_dir's name."""
    private: bool = False


class RunConfig(_Section):
    model: ModelConfig
    method: MethodConfig = MethodConfig()
    data: DataConfig
    train: TrainConfig
    validation: ValidationConfig = ValidationConfig()
    hub: HubConfig = HubConfig()


def _format_error(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    if error["type"] == "missing":
        return f"{path}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    if "got" in message or isinstance(error["input"], dict):
        return f"{path}: {message}"
    return f"{path}: {message} (got {error['input']!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split "section.key=value"; the value is read as a TOML literal, else kept as a string."""
    if "=" not in text:
        raise ConfigError([f"--set {text}: expected section.key=value"])
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply "section.key=value" strings (values read as TOML literals)."""
    for text in overrides:
        keys, value = parse_override(text)
        set_key(raw, keys, value, where=f"--set {text}")
    return raw


def set_key(raw: dict[str, Any], keys: list[str], value: Any, where: str = "") -> None:
    """Set raw[k1][k2]... = value, creating sections; for values that are not TOML text
    (paths with quotes or backslashes come through unchanged)."""
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError([f"{where or '.'.join(keys)}: {key} is not a section"])
    node[keys[-1]] = value


def build_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError([_format_error(e) for e in error.errors()], source) from None


def load_config(
    path: str | Path, overrides: list[str] = (), values: dict[str, Any] | None = None
) -> RunConfig:
    """Read a TOML run config, apply --set overrides and exact `values` ("section.key":
    value), and validate it whole."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: no such config file"], str(path))
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: not valid TOML: {error}"], str(path)) from None
    raw = apply_overrides(raw, list(overrides))
    for dotted, value in (values or {}).items():
        set_key(raw, dotted.split("."), value)
    return build_config(raw, str(path))


def to_toml(config: RunConfig) -> str:
    """The resolved config as TOML (None values omitted, since TOML has no null)."""
    lines: list[str] = []
    for section, values in config.model_dump(exclude_none=True).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
