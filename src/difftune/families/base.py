"""The seam between the training loop and a model family."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from difftune.config import ModelConfig
from difftune.paths import PathError


@dataclass(frozen=True)
class ModelInputs:
    """What the denoiser sees in one step; methods add to it through `extra`."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    text: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)

    def with_extra(self, **values: Any) -> ModelInputs:
        return replace(self, extra={**self.extra, **values})


@dataclass
class Parts:
    """The loaded components of a base pipeline, frozen unless a method says otherwise."""

    source: str
    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    denoiser: nn.Module
    noise_scheduler: Any

    def modules(self) -> list[nn.Module]:
        return [self.text_encoder, self.vae, self.denoiser]


def check_weights_loaded(modules: dict[str, nn.Module], source: str) -> None:
    """Every parameter got a value from its file. diffusers leaves a parameter the weight
    file lacks on the "meta" device (no data), and the first use fails deep inside torch;
    a weight file that does not match its config.json is named here instead."""
    for name, module in modules.items():
        missing = [key for key, parameter in module.named_parameters() if parameter.is_meta]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise PathError(f"{source}: {name} has no weights for {len(missing)} parameter(s) ({shown}): its weight "
                            "file does not match its config.json")


def inference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A trained model in the frozen parts' dtype, for generation.

    A copy when anything differs: the fp32 master weights are never rounded, and the copy
    drops accelerate's mixed-precision forward wrapper (an instance attribute that makes
    outputs fp32, which a half-precision pipeline cannot take). Works alike for diffusers,
    transformers and peft-adapted modules.
    """
    patched = "forward" in vars(model)
    if not patched and all(p.dtype == dtype for p in model.parameters()):
        return model
    fresh = copy.deepcopy(model)
    vars(fresh).pop("forward", None)
    vars(fresh).pop("_original_forward", None)
    return fresh.to(dtype=dtype).eval()


class Family(Protocol):
    """A model family: how to load it, encode its inputs and run its denoiser."""

    name: str
    supports: frozenset[str]
    lora_targets: tuple[str, ...]
    """Denoiser module names a LoRA adapts by default."""

    def load(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        """The frozen parts. denoiser_in_memory: read the denoiser's weights into memory
        instead of mapping the file (see setup.denoiser_in_memory)."""
        ...

    def encode_prompts(self, parts: Parts, captions: list[str]) -> torch.Tensor: ...

    def encode_images(
        self, parts: Parts, pixels: torch.Tensor, generators: list[torch.Generator] | None
    ) -> torch.Tensor: ...

    def latent_distribution(self, parts: Parts, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image encoder's posterior (mean, std), before any scaling."""
        ...

    def sample_latents(
        self, parts: Parts, mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        """Scaled latents drawn from a posterior, one generator per sample (None: the mean)."""
        ...

    def text_cache_identity(self, parts: Parts) -> dict[str, Any]:
        """Everything besides the weights that changes a prompt's embedding (tokenizer)."""
        ...

    def predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor: ...

    def vae_scale_factor(self, parts: Parts) -> int: ...

    def make_controlnet(
        self, parts: Parts, source: str | None, conditioning_channels: int
    ) -> nn.Module: ...

    def load_controlnet(self, path: str) -> nn.Module: ...

    def controlnet_residuals(
        self, controlnet: nn.Module, inputs: ModelInputs, conditioning: torch.Tensor
    ) -> dict[str, Any]: ...

    def controlnet_pipeline(self, parts: Parts, controlnet: nn.Module) -> Any: ...

    def text_to_image_pipeline(self, parts: Parts) -> Any: ...

    def save_lora(self, out_dir: Path, unet: nn.Module, text_encoder: nn.Module | None) -> None:
        """Adapter weights in the file the family's pipeline `load_lora_weights` reads."""
        ...
