"""FLUX.1 (Black Forest Labs 2024): a rectified-flow transformer over 2x2 patches of the
latents, conditioned on a T5 sequence and CLIP's pooled embedding, with rotary position
ids for the text (zeros) and the image tokens (row, column), and for guidance-distilled
bases (dev) a guidance embedding.

As diffusers' FluxPipeline and its training scripts (train_dreambooth_lora_flux.py):
- the prompt: T5's last hidden states at max_sequence_length (512, or the T5 tokenizer's
  model_max_length if smaller, passed to every pipeline call) and CLIP's pooled output;
- the latents: the VAE's posterior, shifted then scaled (shift_factor, scaling_factor),
  packed into (tokens, channels x 4); the velocity comes back unpacked;
- the time: the objective's sigma (the transformer takes timestep / 1000), shifted by the
  image's token count as the scheduler's config says (use_dynamic_shifting);
- guidance: `[model] guidance` (3.5) when the transformer has a guidance embedding.
Every size comes from the configs: VAE factor, latent channels, text widths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from difftune.families.base import ModelInputs, Parts, device_of, dtype_of
from difftune.families.edit import predict_by_references
from difftune.families.latent import LatentFamily
from difftune.families.flux.facts import FACTS

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import nn

    from difftune.config import ModelConfig, ObjectiveConfig
    from difftune.method_settings import MethodSettings
    from difftune.objectives import Objective

MAX_SEQUENCE_LENGTH = 512
"""T5 tokens per prompt at most (FluxPipeline's limit and default): the T5 tokenizer's
model_max_length below that (a small base's), and every pipeline call gets the same
max_sequence_length (`generation_options`), so generation sees the padding training saw."""
PATCH = 2
"""Latents are packed in 2x2 patches: sides must be multiples of the VAE factor x 2."""


class Flux(LatentFamily):
    facts = FACTS
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    tokenizer_names = ("tokenizer", "tokenizer_2")
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0")
    """The attention projections, as diffusers' Flux LoRA script adapts by default."""
    kohya_prefixes: dict[str, str] = {}
    """sd-scripts names Flux modules in BFL's layout (fused qkv): not written yet."""
    kohya_unet_names = "diffusers"
    license = "other"
    card_tags = ["flux", "flux-diffusers", "text-to-image"]
    trainable_text_encoder_names = ("text_encoder",)
    """diffusers' Flux LoRA loader adapts CLIP, never T5 (train_text_encoder: CLIP alone)."""
    controlnet_class = "FluxControlNetModel"
    input_projection = "x_embedder"
    """The denoiser's input layer, which channel-concat Control widens."""
    negative_prompt = False
    """Guidance-distilled: FluxControlPipeline takes no negative prompt, and the others use
    one only with true classifier-free guidance (true_cfg_scale), which generation does not run."""
    attention_options = "joint_attention_kwargs"
    latent_patch = PATCH
    gpu_dtype = "bfloat16"  # Flux overflows in fp16

    def load(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        from dataclasses import replace

        parts = self.load_parts(config, denoiser_in_memory)
        return replace(parts, constants={"guidance": config.guidance},
                       trainable_text_encoder_names=self.trainable_text_encoder_names)

    def method_problems(self, method: MethodSettings, base: str, revision: str | None = None) -> list[str]:
        """A new ControlNet copies blocks of the transformer: a count set above what it has is
        refused (the default, 4, takes all a smaller base has, saying so: make_controlnet)."""
        from difftune.model_files import read_config

        if method.result != "controlnet" or method.controlnet is not None:
            return []
        config = read_config(base, f"{self.denoiser_name}/config.json", revision) or {}
        problems = []
        for key, count, kind in (("controlnet_double_blocks", "num_layers", "dual-stream"),
                                 ("controlnet_single_blocks", "num_single_layers", "single-stream")):
            has, wanted = config.get(count), getattr(method, key)
            # a count left at its default (diffusers' 4) takes what a smaller base has, with a line (make_controlnet)
            if isinstance(has, int) and wanted > has and wanted != type(method).model_fields[key].default:
                problems.append(f"method.{key} = {wanted}: the base's transformer has {has} {kind} blocks "
                                f"({count} in {self.denoiser_name}/config.json), and a ControlNet copies at most "
                                "that many")
        return problems

    def objective(self, parts: Parts, config: ObjectiveConfig) -> Objective:
        from difftune.objectives import FlowMatching

        return FlowMatching(parts.noise_scheduler, config, self.shift_mu(parts), PATCH)

    def shift_mu(self, parts: Parts) -> Callable[[int], float]:
        """FluxPipeline's calculate_shift: mu linear in the token count between
        (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
        config = parts.noise_scheduler.config

        def mu(tokens: int) -> float:
            slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
            return config.base_shift + slope * (tokens - config.base_image_seq_len)

        return mu

    # --- text ------------------------------------------------------------------------------

    def encode_prompts(self, parts: Parts, captions: list[str]) -> dict[str, torch.Tensor]:
        clip, t5 = parts.components["text_encoder"], parts.components["text_encoder_2"]
        clip_ids = self.token_ids(parts.components["tokenizer"], captions).to(device_of(clip))
        tokenizer = parts.components["tokenizer_2"]
        t5_ids = tokenizer(captions, max_length=sequence_length(tokenizer), padding="max_length", truncation=True,
                           return_tensors="pt").input_ids
        return {"hidden_states": t5(t5_ids.to(device_of(t5)), output_hidden_states=False)[0],
                "pooled": clip(clip_ids, output_hidden_states=False).pooler_output}

    def text_cache_identity(self, parts: Parts) -> dict[str, Any]:
        return {**super().text_cache_identity(parts),
                "max_sequence_length": sequence_length(parts.components["tokenizer_2"])}

    def generation_options(self, pipeline: Any) -> dict[str, Any]:
        return {"max_sequence_length": sequence_length(pipeline.tokenizer_2)}

    # --- the denoiser ----------------------------------------------------------------------

    def predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor:
        if "references" in inputs.extra:  # an edit batch (FLUX.1 Kontext)
            return predict_by_references(inputs, lambda group: self._predict(parts, group))
        return self._predict(parts, inputs)

    def _predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor:
        import torch

        transformer = parts.denoiser  # possibly wrapped (DDP): no .config or .dtype there
        dtype, device = dtype_of(transformer), inputs.noisy.device
        batch, _, height, width = inputs.noisy.shape
        if height % PATCH or width % PATCH:
            raise ValueError(f"Flux packs latents in {PATCH}x{PATCH} patches: latents of {height}x{width} do not "
                             "divide (data.resolution must be a multiple of the VAE factor x 2)")
        text = inputs.text["hidden_states"]
        tokens, ids = pack(inputs.noisy), image_ids(height // PATCH, width // PATCH, device, dtype)
        target_tokens = tokens.shape[1]
        for reference in inputs.extra.get("reference_latents", ()):
            # after the target's tokens, its ids' first axis 1 (FluxKontextPipeline.prepare_latents)
            reference_ids = image_ids(reference.shape[2] // PATCH, reference.shape[3] // PATCH, device, dtype)
            reference_ids[:, 0] = 1
            tokens, ids = torch.cat([tokens, pack(reference.to(tokens.dtype))], 1), torch.cat([ids, reference_ids])
        velocity = transformer(
            hidden_states=tokens.to(dtype),
            timestep=(inputs.timesteps / 1000).to(dtype),
            guidance=self._guidance(parts, transformer, batch, device),
            pooled_projections=inputs.text["pooled"].to(dtype),
            encoder_hidden_states=text.to(dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=device, dtype=dtype),
            img_ids=ids,
            controlnet_block_samples=_cast(inputs.extra.get("controlnet_block_samples"), dtype),
            controlnet_single_block_samples=_cast(inputs.extra.get("controlnet_single_block_samples"), dtype),
            return_dict=False,
        )[0][:, :target_tokens]
        # Control widens the input (noisy and control latents); the output keeps the latents' channels
        return unpack(velocity, velocity.shape[-1] // PATCH**2, height, width)

    # --- edit (FLUX.1 Kontext) ---------------------------------------------------------------

    prompt_sees_references = False

    def reference_size(self, reference: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
        """The target's size: generation passes the reference at that size and keeps it
        (`edit_arguments`: no resizing to Kontext's preferred resolutions)."""
        return target

    def max_references(self, base: str, revision: str | None = None) -> int | None:
        """FluxKontextPipeline takes one reference image."""
        return 1

    def encode_edit_prompts(self, parts: Parts, captions: list[str], references: list[Any]) -> dict[str, Any]:
        return self.encode_prompts(parts, captions)

    def edit_arguments(self, image: Any, width: int | None, height: int | None) -> dict[str, Any]:
        """Each reference at the target's size, kept there (`_auto_resize` off), and the
        target's area as max_area (the pipeline otherwise sizes both for 1024x1024)."""
        from PIL import Image

        if image is None:
            return {"height": height, "width": width}
        first = image[0] if isinstance(image, list) else image
        width, height = width or first.width, height or first.height

        def sized(reference: Image.Image) -> Image.Image:
            return reference if reference.size == (width, height) else reference.resize(
                (width, height), Image.Resampling.BILINEAR)

        image = [sized(one) for one in image] if isinstance(image, list) else sized(image)
        return {"image": image, "height": height, "width": width, "max_area": width * height, "_auto_resize": False}

    # --- pipelines and what leaves a run ----------------------------------------------------

    def widened_config(self, config: Any) -> dict[str, Any]:
        """The transformer config of a Control model: twice the packed input channels, the
        output as before (FluxControlPipeline reads the latent channels as in_channels / 8)."""
        return {"in_channels": config.in_channels * 2, "out_channels": config.out_channels or config.in_channels}

    def control_arguments(self, image: Any) -> dict[str, Any]:
        return {"control_image": image}

    def make_controlnet(self, parts: Parts, source: str | None, settings: MethodSettings | None = None) -> nn.Module:
        """FluxControlNetModel.from_transformer, as diffusers' train_controlnet_flux.py: the
        first `controlnet_double_blocks` dual-stream and `controlnet_single_blocks`
        single-stream blocks copied, zero-initialised output projections, and the control
        image's packed latents as its input (controlnet_cond)."""
        import torch
        from diffusers import FluxControlNetModel

        if source is not None:
            return FluxControlNetModel.from_pretrained(source, dtype=torch.float32)
        config = parts.denoiser.config
        double = settings.controlnet_double_blocks if settings is not None else 4
        single = settings.controlnet_single_blocks if settings is not None else 4
        # more than it has: the default on a smaller base, or a base whose config the plan could not read
        if double > config.num_layers or single > config.num_single_layers:
            import logging

            logging.getLogger(__name__).warning(
                "method.controlnet_double_blocks / _single_blocks = %d / %d: the base's transformer has %d / %d; "
                "the ControlNet copies them all", double, single, config.num_layers, config.num_single_layers)
        return FluxControlNetModel.from_transformer(
            parts.denoiser, num_layers=min(double, config.num_layers),
            num_single_layers=min(single, config.num_single_layers), attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)

    def controlnet_residuals(
        self, parts: Parts, controlnet: nn.Module, inputs: ModelInputs, conditioning: torch.Tensor
    ) -> dict[str, Any]:
        import torch

        with torch.no_grad():  # the control image's latents, as FluxControlNetPipeline makes them
            # (on the VAE's device, which a latent cache may have moved off the accelerator)
            control = self.encode_images(parts, conditioning * 2 - 1, None).to(inputs.noisy.device)
        batch, _, height, width = inputs.noisy.shape
        text = inputs.text["hidden_states"]
        dtype = inputs.noisy.dtype
        blocks, single = controlnet(
            hidden_states=pack(inputs.noisy),
            controlnet_cond=pack(control.to(dtype)),
            timestep=inputs.timesteps / 1000,
            guidance=self._guidance(parts, controlnet, batch, inputs.noisy.device),
            pooled_projections=inputs.text["pooled"].to(dtype),
            encoder_hidden_states=text.to(dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=inputs.noisy.device, dtype=dtype),
            img_ids=image_ids(height // PATCH, width // PATCH, inputs.noisy.device, dtype),
            return_dict=False,
        )
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": single}

    def _guidance(self, parts: Parts, model: nn.Module, batch: int, device: Any) -> torch.Tensor | None:
        import torch

        config = getattr(model, "module", model).config
        if not config.guidance_embeds:
            return None
        return torch.full((batch,), parts.constants.get("guidance", 3.5), device=device, dtype=torch.float32)

    def load_controlnet(self, path: str, dtype: Any) -> Any:
        from diffusers import FluxControlNetModel

        return FluxControlNetModel.from_pretrained(path, dtype=dtype)


def sequence_length(tokenizer: Any) -> int:
    return min(MAX_SEQUENCE_LENGTH, tokenizer.model_max_length)


def _cast(samples: list[torch.Tensor] | None, dtype: torch.dtype) -> list[torch.Tensor] | None:
    return None if samples is None else [sample.to(dtype) for sample in samples]


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4), as FluxPipeline._pack_latents."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // PATCH) * (width // PATCH), channels * PATCH * PATCH)


def unpack(tokens: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack`."""
    batch = tokens.shape[0]
    patches = tokens.view(batch, height // PATCH, width // PATCH, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


def image_ids(rows: int, columns: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows * columns, 3): 0, row, column per token (FluxPipeline._prepare_latent_image_ids)."""
    import torch

    ids = torch.zeros(rows, columns, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(columns, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * columns, 3)


FAMILY = Flux()
