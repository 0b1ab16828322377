"""Stable Diffusion 1.x / 2.x: CLIP text encoder, KL VAE, UNet2DConditionModel."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from peft import get_peft_model_state_dict
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel

from difftune.config import ModelConfig
from difftune.families.base import ModelInputs, Parts

# The ControlNet conditioning embedding downsamples by 2 per channel stage after the
# first; its stride must equal the VAE's or the residuals miss the latent grid.
_CONDITIONING_CHANNELS = (16, 32, 96, 256)


class StableDiffusion:
    name = "sd"
    supports = frozenset({"controlnet", "full", "lora", "dreambooth"})

    def load(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        common = {"revision": config.revision}
        source = config.pretrained
        tokenizer = AutoTokenizer.from_pretrained(
            config.tokenizer or source,
            subfolder="" if config.tokenizer else "tokenizer",
            **common,
        )
        weights = {**common, "variant": config.variant}
        return Parts(
            source=source,
            tokenizer=tokenizer,
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
            denoiser=UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", disable_mmap=denoiser_in_memory, **weights),
            noise_scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common),
        )

    def tokenize(self, parts: Parts, captions: list[str]) -> torch.Tensor:
        tokenizer = parts.tokenizer
        return tokenizer(
            captions,
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids

    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet attention projections, as diffusers' SD LoRA scripts adapt."""

    def text_cache_identity(self, parts: Parts) -> dict[str, Any]:
        tokenizer = parts.tokenizer
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        return {"tokenizer": hashlib.blake2b(vocab.encode()).hexdigest(),
                "max_length": tokenizer.model_max_length, "padding": "max_length"}

    def encode_prompts(self, parts: Parts, captions: list[str]) -> torch.Tensor:
        # The encoder may be wrapped for training (DDP): ask a parameter for the device.
        device = next(parts.text_encoder.parameters()).device
        ids = self.tokenize(parts, captions).to(device)
        return parts.text_encoder(ids, return_dict=False)[0]

    def encode_images(
        self, parts: Parts, pixels: torch.Tensor, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        """Latents drawn from the VAE posterior, each sample with its own generator
        (None: the posterior mean, as for validation)."""
        mean, std = self.latent_distribution(parts, pixels)
        return self.sample_latents(parts, mean, std, generators)

    def latent_distribution(self, parts: Parts, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std (what a latent cache stores)."""
        vae = parts.vae
        posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    def sample_latents(
        self, parts: Parts, mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        if generators is None:
            latents = mean
        else:
            eps = torch.stack([
                torch.randn(mean.shape[1:], generator=g, device=mean.device, dtype=mean.dtype)
                for g in generators
            ])
            latents = mean + std * eps
        return latents * parts.vae.config.scaling_factor

    def predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor:
        unet = parts.denoiser  # possibly wrapped by accelerate (DDP): no .dtype there
        dtype = next(unet.parameters()).dtype
        down = inputs.extra.get("down_block_additional_residuals")
        mid = inputs.extra.get("mid_block_additional_residual")
        return unet(
            inputs.noisy.to(dtype),
            inputs.timesteps,
            encoder_hidden_states=inputs.text.to(dtype),
            down_block_additional_residuals=None if down is None else [d.to(dtype) for d in down],
            mid_block_additional_residual=None if mid is None else mid.to(dtype),
            return_dict=False,
        )[0]

    def vae_scale_factor(self, parts: Parts) -> int:
        return 2 ** (len(parts.vae.config.block_out_channels) - 1)

    def make_controlnet(
        self, parts: Parts, source: str | None, conditioning_channels: int
    ) -> nn.Module:
        if source is not None:
            return self.load_controlnet(source)
        stages = self.vae_scale_factor(parts).bit_length()
        return ControlNetModel.from_unet(
            parts.denoiser,
            conditioning_embedding_out_channels=_CONDITIONING_CHANNELS[:stages],
            conditioning_channels=conditioning_channels,
        )

    def load_controlnet(self, path: str) -> nn.Module:
        return ControlNetModel.from_pretrained(path, dtype=torch.float32)

    def controlnet_residuals(
        self, controlnet: nn.Module, inputs: ModelInputs, conditioning: torch.Tensor
    ) -> dict[str, Any]:
        down, mid = controlnet(
            inputs.noisy,
            inputs.timesteps,
            encoder_hidden_states=inputs.text,
            controlnet_cond=conditioning,
            return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def controlnet_pipeline(self, parts: Parts, controlnet: nn.Module) -> Any:
        """An inference pipeline that reuses the loaded parts (nothing re-read from disk)."""
        scheduler = UniPCMultistepScheduler.from_config(parts.noise_scheduler.config)
        return StableDiffusionControlNetPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.denoiser,
            controlnet=controlnet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_lora(self, out_dir: Path, unet: nn.Module, text_encoder: nn.Module | None) -> None:
        """diffusers' LoRA file (pytorch_lora_weights.safetensors) with each adapter's
        config as metadata, so load_lora_weights restores alpha and rank exactly."""
        layers, metadata = {}, {}
        for prefix, module in (("unet", unet), ("text_encoder", text_encoder)):
            if module is None:
                continue
            # peft's key names, which load_lora_weights reads as they are. (diffusers'
            # convert_state_dict_to_diffusers renames only attention projections, and a
            # file mixing both namings loads without the renamed ones.)
            state = get_peft_model_state_dict(module, save_embedding_layers=False)
            layers[f"{prefix}_lora_layers"] = {k: v.contiguous() for k, v in state.items()}  # channels_last
            metadata[f"{prefix}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        StableDiffusionPipeline.save_lora_weights(out_dir, safe_serialization=True, **layers, **metadata)

    def text_to_image_pipeline(self, parts: Parts) -> Any:
        """The plain pipeline over the loaded parts (UniPC for sampling)."""
        return StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.denoiser,
            scheduler=UniPCMultistepScheduler.from_config(parts.noise_scheduler.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
