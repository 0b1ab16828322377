"""Stable Diffusion 1.x / 2.x: CLIP text encoder, KL VAE, UNet2DConditionModel.

Also the base of the other UNet latent-diffusion families (SDXL): a subclass names its
parts and overrides what differs (text encoders, added conditioning, pipelines).
Heavy libraries are imported inside the functions (see families/base.py).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.families.base import ModelInputs, Parts, dtype_of

if TYPE_CHECKING:
    import torch
    from torch import nn

    from difftune.config import ModelConfig, ObjectiveConfig
    from difftune.objectives import Objective

# The ControlNet conditioning embedding downsamples by 2 per channel stage after the
# first; its stride must equal the VAE's or the residuals miss the latent grid.
_CONDITIONING_CHANNELS = (16, 32, 96, 256)


class StableDiffusion:
    name = "sd"
    description = "Stable Diffusion 1.x and 2.x"
    supports = frozenset({"controlnet", "full", "lora", "dreambooth"})
    denoiser_name = "unet"
    objective_kind = "ddpm"
    """Which options of [objective] apply (config.sections.OBJECTIVE_OPTIONS)."""
    text_encoder_classes = {"text_encoder": "CLIPTextModel"}
    """transformers class of each text encoder, by part name (in encoding order)."""
    tokenizer_names = ("tokenizer",)
    """One tokenizer per text encoder, in the same order."""
    default_resolution = 512
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet attention projections, as diffusers' SD LoRA scripts adapt."""
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    kohya_unet_names = "diffusers"
    """How sd-scripts names the family's UNet modules in LoRA keys: by diffusers' paths, or
    by the "original" (LDM/SGM) layout's."""
    license = "creativeml-openrail-m"
    card_tags = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image"]
    pipeline_classes = {"text_to_image": "StableDiffusionPipeline", "controlnet": "StableDiffusionControlNetPipeline"}
    pipeline_options: dict[str, Any] = {"safety_checker": None, "feature_extractor": None,
                                        "requires_safety_checker": False}
    """Keyword arguments every pipeline of the family is built with."""

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return tuple(self.text_encoder_classes)

    @property
    def components(self) -> dict[str, str]:
        return {**dict.fromkeys(self.tokenizer_names, "tokenizer"), **dict.fromkeys(self.text_encoder_names, "model"),
                "vae": "model", self.denoiser_name: "model", "scheduler": "scheduler"}

    # --- loading ---------------------------------------------------------------------------

    def folder_problems(self, folder: Path) -> list[str]:
        """Every tokenizer cuts prompts at one length: the encoders' outputs are joined
        token by token (SDXL), which diffusers' pipelines need as well."""
        lengths = {}
        for name in self.tokenizer_names:
            try:
                lengths[name] = json.loads((folder / name / "tokenizer_config.json").read_text()).get("model_max_length")
            except (OSError, ValueError, AttributeError):
                continue
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name} {length}" for name, length in lengths.items())
            return [f"its tokenizers cut prompts at different lengths ({shown}); they must agree"]
        return []

    def load(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer

        common = {"revision": config.revision}
        source = config.pretrained
        weights = {**common, "variant": config.variant}
        components: dict[str, Any] = {}
        for number, name in enumerate(self.tokenizer_names):
            # model.tokenizer replaces the first tokenizer (the one every family has)
            other = config.tokenizer if number == 0 else None
            components[name] = AutoTokenizer.from_pretrained(other or source, subfolder="" if other else name, **common)
        lengths = {components[name].model_max_length for name in self.tokenizer_names}
        if len(lengths) > 1:  # model.tokenizer of another length than the pipeline's second one
            from difftune.paths import PathError

            raise PathError(f"the tokenizers ({', '.join(self.tokenizer_names)}) cut prompts at different lengths "
                            f"{sorted(lengths)}: they must agree (model.tokenizer?)")
        for name, class_name in self.text_encoder_classes.items():
            components[name] = getattr(transformers, class_name).from_pretrained(source, subfolder=name, **weights)
        components["vae"] = (AutoencoderKL.from_pretrained(config.vae, revision=config.revision) if config.vae
                             else AutoencoderKL.from_pretrained(source, subfolder="vae", **weights))
        components[self.denoiser_name] = UNet2DConditionModel.from_pretrained(
            source, subfolder=self.denoiser_name, disable_mmap=denoiser_in_memory, **weights)
        components["scheduler"] = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
        return Parts(source, components, self.denoiser_name, self.text_encoder_names,
                     self.pipeline_settings(source, config.revision))

    def pipeline_settings(self, source: str, revision: str | None) -> dict[str, Any]:
        """The options in the base's model_index.json that the family's pipelines take
        besides their components (booleans and numbers only: SDXL's force_zeros_for_empty_prompt)."""
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(source, revision=revision)
        taken = set()
        for cls in map(self.pipeline_class, (False, True)):
            taken |= set(inspect.signature(cls.__init__).parameters)
        return {key: value for key, value in index.items()
                if key in taken and key not in self.components and isinstance(value, (bool, int, float))}

    def objective(self, parts: Parts, config: ObjectiveConfig) -> Objective:
        from difftune.objectives import DiscreteDiffusion

        return DiscreteDiffusion(parts.noise_scheduler, config)

    # --- text ------------------------------------------------------------------------------

    def token_ids(self, tokenizer: Any, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                         truncation=True, return_tensors="pt").input_ids

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

    def encode_prompts(self, parts: Parts, captions: list[str]) -> dict[str, torch.Tensor]:
        encoder = parts.components["text_encoder"]
        # The encoder may be wrapped for training (DDP): ask a parameter for the device.
        ids = self.token_ids(parts.components["tokenizer"], captions).to(next(encoder.parameters()).device)
        return {"hidden_states": encoder(ids, return_dict=False)[0]}

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

    # --- the denoiser ----------------------------------------------------------------------

    def added_conditions(self, inputs: ModelInputs, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
        """The UNet's added_cond_kwargs (SD has none)."""
        return None

    def predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor:
        unet = parts.denoiser  # possibly wrapped by accelerate (DDP): no .dtype there
        dtype = dtype_of(unet)
        down = inputs.extra.get("down_block_additional_residuals")
        mid = inputs.extra.get("mid_block_additional_residual")
        return unet(
            inputs.noisy.to(dtype),
            inputs.timesteps,
            encoder_hidden_states=inputs.text["hidden_states"].to(dtype),
            added_cond_kwargs=self.added_conditions(inputs, dtype),
            down_block_additional_residuals=None if down is None else [d.to(dtype) for d in down],
            mid_block_additional_residual=None if mid is None else mid.to(dtype),
            return_dict=False,
        )[0]

    def make_controlnet(self, parts: Parts, source: str | None, conditioning_channels: int) -> nn.Module:
        import torch
        from diffusers import ControlNetModel

        if source is not None:
            return ControlNetModel.from_pretrained(source, dtype=torch.float32)
        stages = self.vae_scale_factor(parts).bit_length()
        return ControlNetModel.from_unet(
            parts.denoiser,
            conditioning_embedding_out_channels=_CONDITIONING_CHANNELS[:stages],
            conditioning_channels=conditioning_channels,
        )

    def controlnet_residuals(
        self, controlnet: nn.Module, inputs: ModelInputs, conditioning: torch.Tensor
    ) -> dict[str, Any]:
        down, mid = controlnet(
            inputs.noisy,
            inputs.timesteps,
            encoder_hidden_states=inputs.text["hidden_states"],
            controlnet_cond=conditioning,
            added_cond_kwargs=self.added_conditions(inputs, inputs.noisy.dtype),
            return_dict=False,
        )
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    # --- pipelines and what leaves a run ----------------------------------------------------

    def pipeline_class(self, controlnet: bool) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_classes["controlnet" if controlnet else "text_to_image"])

    def pipeline(self, parts: Parts) -> Any:
        """An inference pipeline over the loaded parts (UniPC for sampling): the ControlNet
        pipeline when the parts hold a "controlnet"."""
        from diffusers import UniPCMultistepScheduler

        cls = self.pipeline_class("controlnet" in parts.components)
        wanted = inspect.signature(cls.__init__).parameters
        components = {name: part for name, part in parts.components.items() if name in wanted}
        components["scheduler"] = UniPCMultistepScheduler.from_config(parts.noise_scheduler.config)
        settings = {key: value for key, value in parts.settings.items() if key in wanted}
        return cls(**components, **{**settings, **self.pipeline_options})

    def control_arguments(self, image: Any) -> dict[str, Any]:
        return {"image": image}

    def load_pipeline(self, base: str, dtype: Any, controlnet: Any = None) -> Any:
        extra = {} if controlnet is None else {"controlnet": controlnet}
        return self.pipeline_class(controlnet is not None).from_pretrained(base, dtype=dtype, **extra,
                                                                           **self.pipeline_options)

    def load_controlnet(self, path: str, dtype: Any) -> Any:
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(path, dtype=dtype)

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
        self.pipeline_class(False).save_lora_weights(out_dir, safe_serialization=True, **layers, **metadata)

    def usage(self, result: str, repo: str, base: str) -> str:
        text_to_image = self.pipeline_classes["text_to_image"]
        if result == "controlnet":
            pipeline = self.pipeline_classes["controlnet"]
            return (f"from diffusers import ControlNetModel, {pipeline}\n"
                    f'controlnet = ControlNetModel.from_pretrained("{repo}")\n'
                    f'pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet)')
        if result == "lora":
            return (f"from diffusers import {text_to_image}\n"
                    f'pipe = {text_to_image}.from_pretrained("{base}")\n'
                    f'pipe.load_lora_weights("{repo}")')
        return f'from diffusers import {text_to_image}\npipe = {text_to_image}.from_pretrained("{repo}")'

    def export_single_file(self, pipeline_dir: Path, out_file: Path, half: bool) -> Path:
        from difftune.export.single_file import export_single_file

        return export_single_file(pipeline_dir, out_file, half=half)


FAMILY = StableDiffusion()
