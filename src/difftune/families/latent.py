"""What every latent-diffusion family shares: text encoders and tokenizers loaded by
class name, a VAE whose posterior makes the latents (scaled and shifted as its config
says), the text cache's identity, and the diffusers pipelines, LoRA files and usage
snippets built from the family's class names. SD/SDXL (UNet) and Flux (transformer)
subclass it and add their denoiser, objective and conditioning.
Heavy libraries are imported inside the functions (see families/base.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.catalog import FamilyFacts
from difftune.families.base import Parts

if TYPE_CHECKING:
    import torch
    from torch import nn

    from difftune.config import ModelConfig


class LatentFamily:
    facts: FamilyFacts
    """What the catalog lists (families/<name>/facts.py): name, description, capabilities,
    objective_kind, default_resolution, denoiser_name, denoiser_class, text_encoder_classes,
    pipeline_classes, caches_text, mixed_precisions, text_encoder_trainable,
    controlnet_blocks. Each is also an attribute of the family (__init_subclass__)."""
    name: str
    description: str
    capabilities: frozenset[str]
    denoiser_name: str
    denoiser_class: str
    objective_kind: str
    text_encoder_classes: dict[str, str]
    pipeline_classes: dict[str, str]
    scheduler_class: str
    """diffusers class the training noise schedule is read with."""
    tokenizer_names: tuple[str, ...]
    """One tokenizer per text encoder, in the same order."""
    trainable_text_encoder_names: tuple[str, ...] | None = None
    """The text encoders train_text_encoder trains (None: every one)."""
    pipeline_options: dict[str, Any] = {}
    """Keyword arguments every pipeline of the family is built with."""
    latent_patch = 1
    """Latent pixels per side of one denoiser token (Flux packs 2x2): training sizes are
    multiples of the VAE factor times this."""
    patch_in_config = False
    """Whether the denoiser's config.json says its patch (patch_size; latent_patch when not)."""
    controlnet_class = "ControlNetModel"
    """The diffusers class of the family's ControlNets."""
    vae_class = "AutoencoderKL"
    """The diffusers class of the family's VAE (Qwen-Image: AutoencoderKLQwenImage)."""
    negative_prompt = True
    """Whether the family's pipelines use a negative prompt as generation runs them."""
    pipeline_multiple = 1
    """What the family's diffusers pipelines demand of a size besides (a check of their own)."""
    gpu_dtype = "float16"
    """The dtype `difftune generate` runs the pipeline in on a GPU."""
    attention_options = "cross_attention_kwargs"
    """The pipeline call's argument that carries a LoRA scale to the denoiser's attention."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """The facts, written once in facts.py, are the family's attributes too."""
        super().__init_subclass__(**kwargs)
        for fact in fields(cls.facts):
            setattr(cls, fact.name, getattr(cls.facts, fact.name))

    @property
    def supports(self) -> frozenset[str]:
        """The method kinds it trains (derived from its capabilities: FamilyFacts.supports)."""
        return self.facts.supports

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(self.text_encoder_classes)

    @property
    def components(self) -> dict[str, str]:
        return {**dict.fromkeys(self.tokenizer_names, "tokenizer"), **dict.fromkeys(self.text_encoder_names, "model"),
                "vae": "model", self.denoiser_name: "model", "scheduler": "scheduler"}

    def latent_patch_of(self, base: str, revision: str | None = None) -> tuple[int, str]:
        """(latent pixels per side of one denoiser token, where that comes from), before any
        weight loads; a family whose patch is in its denoiser's config (patch_in_config)
        reads it there."""
        if self.patch_in_config:
            from difftune.model_files import read_config

            config = read_config(base, f"{self.denoiser_name}/config.json", revision) or {}
            patch = config.get("patch_size", self.latent_patch)
            return patch, f"the transformer's {patch}x{patch} patches ({self.denoiser_name}/config.json patch_size)"
        return self.latent_patch, f"the {self.latent_patch}x{self.latent_patch} patches {self.description} packs"

    def folder_problems(self, folder: Path) -> list[str]:
        """What a local pipeline folder lacks for this family beyond its files (none, unless
        the family says)."""
        return []

    def method_problems(self, method: Any, base: str, revision: str | None = None) -> list[str]:
        """What the base's configs rule out in the [method] section (Flux: more ControlNet
        blocks than its transformer has), one sentence each, before any weight loads."""
        return []

    # --- loading ---------------------------------------------------------------------------

    def load_parts(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        """Tokenizers, text encoders, the VAE (or model.vae), the denoiser and the
        training schedule, by the family's class names, plus the pipeline's settings."""
        import diffusers
        import transformers
        from transformers import AutoTokenizer

        common = {"revision": config.revision}
        source = config.pretrained
        weights = {**common, "variant": config.variant}
        components: dict[str, Any] = {}
        for number, name in enumerate(self.tokenizer_names):
            # model.tokenizer replaces the first tokenizer (the one every family has)
            other = config.tokenizer if number == 0 else None
            components[name] = AutoTokenizer.from_pretrained(other or source, subfolder="" if other else name, **common)
        for name, class_name in self.text_encoder_classes.items():
            components[name] = getattr(transformers, class_name).from_pretrained(source, subfolder=name, **weights)
        vae_class = getattr(diffusers, self.vae_class)
        components["vae"] = (vae_class.from_pretrained(config.vae, revision=config.revision) if config.vae
                             else vae_class.from_pretrained(source, subfolder="vae", **weights))
        components[self.denoiser_name] = getattr(diffusers, self.denoiser_class).from_pretrained(
            source, subfolder=self.denoiser_name, disable_mmap=denoiser_in_memory, **weights)
        components["scheduler"] = getattr(diffusers, self.scheduler_class).from_pretrained(
            source, subfolder="scheduler", **common)
        return Parts(source, components, self.denoiser_name, self.text_encoder_names,
                     self.pipeline_settings(source, config.revision), weight_options=weights)

    def pipeline_settings(self, source: str, revision: str | None) -> dict[str, Any]:
        """The options in the base's model_index.json that the family's pipelines take
        besides their components (booleans and numbers only: SDXL's force_zeros_for_empty_prompt)."""
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(source, revision=revision)
        import diffusers

        taken = set()
        for class_name in self.pipeline_classes.values():
            taken |= set(inspect.signature(getattr(diffusers, class_name).__init__).parameters)
        return {key: value for key, value in index.items()
                if key in taken and key not in self.components and isinstance(value, (bool, int, float))}

    # --- text ------------------------------------------------------------------------------

    def token_ids(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                         truncation=True, return_tensors="pt").input_ids

    def cached_prompt(self, encoded: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
        return {name: tensor[row] for name, tensor in encoded.items()}

    def text_cache_identity(self, parts: Parts) -> dict[str, Any]:
        """Each tokenizer as it tokenizes: its whole backend (vocabulary, merges, normalizer,
        post-processor) and the settings padding reads (pad token, length, sides)."""
        identity = {}
        for name in self.tokenizer_names:
            tokenizer = parts.components[name]
            backend = getattr(tokenizer, "backend_tokenizer", None)
            if backend is not None:
                # without the call state: a call with padding/truncation sets those in the backend
                state = json.dumps({k: v for k, v in json.loads(backend.to_str()).items()
                                    if k not in ("padding", "truncation")}, sort_keys=True)
            else:
                state = json.dumps(sorted(tokenizer.get_vocab().items()))
            settings = {"special": tokenizer.special_tokens_map, "pad_id": tokenizer.pad_token_id,
                        "max_length": tokenizer.model_max_length, "padding": "max_length",
                        "sides": [tokenizer.padding_side, tokenizer.truncation_side]}
            digest = hashlib.blake2b(state.encode())
            digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
            identity[name] = digest.hexdigest()
        return identity

    # --- images ----------------------------------------------------------------------------

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
        import torch

        if generators is None:
            latents = mean
        else:
            eps = torch.stack([
                torch.randn(mean.shape[1:], generator=g, device=mean.device, dtype=mean.dtype)
                for g in generators
            ])
            latents = mean + std * eps
        config = parts.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0  # VAEs of later families shift first
        return (latents - shift) * config.scaling_factor

    def vae_scale_factor(self, parts: Parts) -> int:
        return 2 ** (len(parts.vae.config.block_out_channels) - 1)

    # --- pipelines and what leaves a run ----------------------------------------------------

    def pipeline_class(self, kind: str) -> Any:
        """The diffusers pipeline class that runs `kind` ("text_to_image", "controlnet", "control")."""
        import diffusers

        if kind not in self.pipeline_classes:
            raise ValueError(f"family {self.name!r} has no {kind} pipeline")
        return getattr(diffusers, self.pipeline_classes[kind])

    def sampler(self, scheduler: Any) -> Any:
        """The scheduler a pipeline samples with, made from the base's (a fresh one)."""
        return type(scheduler).from_config(scheduler.config)

    def pipeline(self, parts: Parts, kind: str | None = None) -> Any:
        """An inference pipeline over the loaded parts (the family's sampler, or parts.sampler), of `kind`;
        by default the ControlNet pipeline when the parts hold a "controlnet", else text-to-image."""
        kind = kind or ("controlnet" if "controlnet" in parts.components else "text_to_image")
        cls = self.pipeline_class(kind)
        wanted = inspect.signature(cls.__init__).parameters
        components = {name: part for name, part in parts.components.items() if name in wanted}
        components["scheduler"] = (self.sampler(parts.noise_scheduler) if parts.sampler is None
                                   else type(parts.sampler).from_config(parts.sampler.config))
        settings = {key: value for key, value in parts.settings.items() if key in wanted}
        return cls(**components, **{**settings, **self.pipeline_options})

    def generation_options(self, pipeline: Any) -> dict[str, Any]:
        """Call arguments every generation with the family's pipelines takes (Flux: its T5 length)."""
        return {}

    def guidance_arguments(self, pipeline: Any, scale: float, prompt_count: int) -> dict[str, Any]:
        return {"guidance_scale": scale}

    def load_pipeline(self, base: str, dtype: Any, controlnet: Any = None, kind: str | None = None,
                      **parts: Any) -> Any:
        """A saved pipeline of `kind` (by default ControlNet with a `controlnet`, else
        text-to-image), with any parts given in place of its own."""
        extra = {} if controlnet is None else {"controlnet": controlnet}
        cls = self.pipeline_class(kind or ("text_to_image" if controlnet is None else "controlnet"))
        return cls.from_pretrained(base, dtype=dtype, **extra, **parts, **self.pipeline_options)

    def save_lora(self, out_dir: Path, adapted: dict[str, nn.Module]) -> None:
        """diffusers' LoRA file (pytorch_lora_weights.safetensors) with each adapter's
        config as metadata, so load_lora_weights restores alpha and rank exactly."""
        from peft import get_peft_model_state_dict

        layers, metadata = {}, {}
        for name, module in adapted.items():
            # peft's key names, which load_lora_weights reads as they are. (diffusers'
            # convert_state_dict_to_diffusers renames only attention projections, and a
            # file mixing both namings loads without the renamed ones.)
            state = get_peft_model_state_dict(module, save_embedding_layers=False)
            layers[f"{name}_lora_layers"] = {k: v.contiguous() for k, v in state.items()}  # channels_last
            metadata[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
        self.pipeline_class("text_to_image").save_lora_weights(out_dir, safe_serialization=True, **layers, **metadata)
