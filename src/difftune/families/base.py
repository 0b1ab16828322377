"""The seam between the training loop and a model family."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from torch import nn

from difftune.config import ModelConfig


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


def inference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A trained diffusers model in the frozen parts' dtype, for generation.

    A fresh copy: the fp32 master weights are never rounded, and the copy does not carry
    accelerate's mixed-precision forward wrapper (which returns fp32 outputs that a
    half-precision pipeline cannot take).
    """
    weight = next(model.parameters())
    if weight.dtype == dtype:
        return model
    fresh = type(model).from_config(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh.to(weight.device, dtype=dtype).eval()


class Family(Protocol):
    """A model family: how to load it, encode its inputs and run its denoiser."""

    name: str
    supports: frozenset[str]

    def load(self, config: ModelConfig) -> Parts: ...

    def encode_prompts(self, parts: Parts, captions: list[str]) -> torch.Tensor: ...

    def encode_images(
        self, parts: Parts, pixels: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor: ...

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
