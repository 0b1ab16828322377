"""Qwen-Image (Qwen team 2025): a flow-matching MMDiT over 2x2 patches of the latents of a
causal 3-D VAE, conditioned on the last hidden states of Qwen2.5-VL reading the prompt in
a chat template.

As diffusers' QwenImagePipeline and QwenImageControlNetPipeline (and its training scripts,
train_dreambooth_lora_qwen_image.py):
- the prompt: the template around each caption, Qwen2.5-VL's last hidden states of the
  tokens the mask keeps, the template's system prefix (prompt_template_encode_start_idx
  tokens) dropped, zero-padded to the batch's longest with a mask, cut at the pipeline's
  max_sequence_length (512, passed to every call). The text cache keeps each prompt
  unpadded, and a cached batch is padded as the encoder's own (data/samples.stack_padded);
- the latents: the VAE's posterior of one frame (B, C, 1, H, W), normalised per channel by
  the VAE config's latents_mean and latents_std, packed into 2x2 patches;
- the time: the objective's sigma (the transformer takes timestep / 1000), shifted by the
  image's token count (mu linear between base and max shift, the scheduler's time shift);
- the transformer: img_shapes (frames, rows, columns of patches) for its rotary
  positions, the prompt's mask unless every token is kept (the pipeline passes None then);
- a ControlNet: QwenImageControlNetModel.from_transformer (the first
  `method.controlnet_double_blocks` blocks), fed the control image's packed latents;
- edit batches (families/qwenimage_edit): the references' packed latents after the
  target's tokens, img_shapes listing each, the output cut to the target's tokens.
Every size comes from the configs: VAE factor, latent channels, text width.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from difftune.families.base import ModelInputs, Parts, device_of, dtype_of
from difftune.families.edit import predict_by_references
from difftune.families.latent import LatentFamily
from difftune.families.qwenimage.facts import FACTS

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import nn

    from difftune.config import ModelConfig, ObjectiveConfig
    from difftune.method_settings import MethodSettings
    from difftune.objectives import Objective

MAX_SEQUENCE_LENGTH = 512
"""Prompt tokens kept (QwenImagePipeline's call default, where encode_prompt cuts them):
every pipeline call gets the same (`generation_options`)."""
PATCH = 2
"""The pipelines pack latents in 2x2 patches whatever the transformer's config says."""
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
"""What QwenImageEditPlusPipeline writes before the instruction for its image N (a local
of its _get_qwen_prompt_embeds; the templates themselves are read: `prompt_template`)."""


@functools.cache
def prompt_template(pipeline_class: str) -> tuple[str, int, int]:
    """(template, system-prefix tokens dropped, tokens at most before the drop) as the
    pipeline class sets them in its __init__ (read from an instance with no components)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class)
    empty = cls(**dict.fromkeys(p for p in inspect.signature(cls.__init__).parameters if p != "self"))
    return empty.prompt_template_encode, empty.prompt_template_encode_start_idx, empty.tokenizer_max_length


def kept_states(hidden: torch.Tensor, mask: torch.Tensor, drop: int, limit: int | None = None) -> dict[str, Any]:
    """Each row's hidden states where its mask keeps them, the first `drop` left out, the rows
    zero-padded to the longest and cut at `limit`; the mask of what is real (1) or padding (0)."""
    import torch

    rows = [states[keep.bool()][drop:] for states, keep in zip(hidden, mask)]
    longest = max(len(row) for row in rows)
    padded = torch.stack([torch.cat([row, row.new_zeros(longest - len(row), row.shape[1])]) for row in rows])
    kept = torch.stack([(torch.arange(longest, device=hidden.device) < len(row)).long() for row in rows])
    return {"hidden_states": padded[:, :limit], "mask": kept[:, :limit]}


def runs_guidance_embeds() -> bool:
    """Whether the installed diffusers' Qwen-Image time embedding takes a guidance input (in
    0.42 the transformer hands it one that its forward does not take)."""
    import inspect

    from diffusers.models.transformers.transformer_qwenimage import QwenTimestepProjEmbeddings

    return "guidance" in inspect.signature(QwenTimestepProjEmbeddings.forward).parameters


class QwenImage(LatentFamily):
    facts = FACTS
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    vae_class = "AutoencoderKLQwenImage"
    tokenizer_names = ("tokenizer",)
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    """The image stream's attention projections, as diffusers' Qwen-Image LoRA script adapts them."""
    kohya_prefixes: dict[str, str] = {}
    kohya_unet_names = "diffusers"
    license = "apache-2.0"
    card_tags = ["qwen-image", "text-to-image"]
    controlnet_class = "QwenImageControlNetModel"
    attention_options = "attention_kwargs"
    latent_patch = PATCH
    gpu_dtype = "bfloat16"
    template_pipeline = "QwenImagePipeline"
    """The pipeline whose prompt template text-to-image prompts are encoded with."""

    def load(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        from dataclasses import replace

        return replace(self.load_parts(config, denoiser_in_memory), constants={"guidance": config.guidance},
                       trainable_text_encoder_names=())

    def method_problems(self, method: MethodSettings, base: str, revision: str | None = None) -> list[str]:
        """A guidance-distilled transformer only where diffusers can run one; a new ControlNet
        copies `controlnet_double_blocks` of the transformer's blocks (all are dual-stream): at
        least one, at most as many as it has."""
        from difftune.model_files import read_config

        transformer = read_config(base, f"{self.denoiser_name}/config.json", revision) or {}
        if transformer.get("guidance_embeds") and not runs_guidance_embeds():
            import diffusers

            return [f"model.pretrained: its transformer has guidance_embeds = true, and diffusers "
                    f"{diffusers.__version__}'s QwenImageTransformer2DModel cannot run one (its time embedding "
                    "takes no guidance: QwenImagePipeline fails the same way); train a base without it"]
        if method.result != "controlnet" or method.controlnet is not None:
            return []
        problems = []
        default = type(method).model_fields
        if method.controlnet_single_blocks != default["controlnet_single_blocks"].default:
            problems.append("method.controlnet_single_blocks: a Qwen-Image transformer has dual-stream blocks only; "
                            "method.controlnet_double_blocks sets how many the ControlNet copies")
        wanted = method.controlnet_double_blocks
        if wanted == 0:
            problems.append("method.controlnet_double_blocks = 0: a ControlNet of no blocks adds nothing to the "
                            "transformer; copy at least one")
        has = transformer.get("num_layers")
        # a count left at its default (4) takes what a smaller base has, with a line (make_controlnet)
        if isinstance(has, int) and wanted > has and wanted != default["controlnet_double_blocks"].default:
            problems.append(f"method.controlnet_double_blocks = {wanted}: the base's transformer has {has} blocks "
                            f"(num_layers in {self.denoiser_name}/config.json), and a ControlNet copies at most "
                            "that many")
        return problems

    def objective(self, parts: Parts, config: ObjectiveConfig) -> Objective:
        from difftune.objectives import FlowMatching

        return FlowMatching(parts.noise_scheduler, config, self.shift_mu(parts), PATCH)

    def shift_mu(self, parts: Parts) -> Callable[[int], float]:
        """QwenImagePipeline's calculate_shift, with the scheduler config's numbers (the
        pipeline's defaults where it has none): mu linear in the token count between
        (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
        config = parts.noise_scheduler.config

        def mu(tokens: int) -> float:
            base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            return base_shift + (max_shift - base_shift) / (max_len - base_len) * (tokens - base_len)

        return mu

    # --- text ------------------------------------------------------------------------------

    def encode_prompts(self, parts: Parts, captions: list[str]) -> dict[str, torch.Tensor]:
        template, drop, most = prompt_template(self.template_pipeline)
        tokens = parts.components["tokenizer"]([template.format(c) for c in captions], max_length=most + drop,
                                               padding=True, truncation=True, return_tensors="pt")
        return self._encode(parts, dict(tokens), drop, MAX_SEQUENCE_LENGTH)

    def cached_prompt(self, encoded: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
        """The row without its batch's padding (the mask's zeros, after what it keeps)."""
        kept = int(encoded["mask"][row].sum())
        return {"hidden_states": encoded["hidden_states"][row, :kept], "mask": encoded["mask"][row, :kept]}

    def _encode(self, parts: Parts, inputs: dict[str, Any], drop: int, limit: int | None) -> dict[str, Any]:
        """Qwen2.5-VL's last hidden states of the template(s) (and images) in `inputs`."""
        encoder = parts.components["text_encoder"]
        device = device_of(encoder)
        inputs = {name: value.to(device) for name, value in inputs.items() if value is not None}
        hidden = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                         output_hidden_states=True).hidden_states[-1]
        return kept_states(hidden, inputs["attention_mask"], drop, limit)

    def generation_options(self, pipeline: Any) -> dict[str, Any]:
        return {"max_sequence_length": MAX_SEQUENCE_LENGTH}

    def guidance_arguments(self, pipeline: Any, scale: float, prompt_count: int) -> dict[str, Any]:
        """Qwen-Image's pipelines read guidance_scale only for a guidance-distilled transformer
        (guidance_embeds: the scale is its input, as `[model] guidance` is in training, and they
        refuse to run without it). Otherwise they guide only with true_cfg_scale and a negative
        prompt: the empty caption, which is what data.proportion_empty_prompts trains the
        unconditional on (one per prompt: a single string is encoded once, not per prompt)."""
        if pipeline.transformer.config.guidance_embeds:
            return {"guidance_scale": scale, "true_cfg_scale": 1.0}
        if scale <= 1.0:
            return {"true_cfg_scale": 1.0}
        return {"true_cfg_scale": scale, "negative_prompt": [""] * prompt_count}

    # --- images ----------------------------------------------------------------------------

    def latent_distribution(self, parts: Parts, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior of one frame: the VAE takes (B, C, frames, H, W)."""
        vae = parts.vae
        posterior = vae.encode(pixels[:, :, None].to(vae.device, vae.dtype)).latent_dist
        return posterior.mean[:, :, 0], posterior.std[:, :, 0]

    def sample_latents(
        self, parts: Parts, mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        """Drawn as LatentFamily draws them, then normalised per channel as the pipelines'
        _encode_vae_image: (z - latents_mean) / latents_std."""
        import torch

        latents = mean
        if generators is not None:
            latents = mean + std * torch.stack([
                torch.randn(mean.shape[1:], generator=g, device=mean.device, dtype=mean.dtype) for g in generators])
        config = parts.vae.config
        shape = (1, config.z_dim, 1, 1)
        centre = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        spread = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return (latents - centre) / spread

    def vae_scale_factor(self, parts: Parts) -> int:
        return 2 ** len(parts.vae.config.temperal_downsample)

    # --- the denoiser ----------------------------------------------------------------------

    def predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor:
        if "references" in inputs.extra:  # an edit batch (Qwen-Image-Edit)
            return predict_by_references(inputs, lambda group: self._predict(parts, group))
        return self._predict(parts, inputs)

    def _predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor:
        import torch

        transformer = parts.denoiser  # possibly wrapped (DDP): no .config or .dtype there
        dtype = dtype_of(transformer)
        batch, _, height, width = inputs.noisy.shape
        shapes = [patches(inputs.noisy)]
        tokens = pack(inputs.noisy)
        target = tokens.shape[1]
        for reference in inputs.extra.get("reference_latents", ()):
            # after the target's, as QwenImageEditPipeline / QwenImageEditPlusPipeline join them
            tokens = torch.cat([tokens, pack(reference.to(tokens.dtype))], dim=1)
            shapes.append(patches(reference))
        samples = inputs.extra.get("controlnet_block_samples")
        velocity = transformer(
            hidden_states=tokens.to(dtype),
            timestep=(inputs.timesteps / 1000).to(dtype),
            guidance=self._guidance(parts, transformer, batch, inputs.noisy.device),
            encoder_hidden_states_mask=_mask(inputs.text),
            encoder_hidden_states=inputs.text["hidden_states"].to(dtype),
            img_shapes=[shapes] * batch,
            controlnet_block_samples=None if samples is None else [s.to(dtype) for s in samples],
            return_dict=False,
        )[0][:, :target]
        return unpack(velocity, height, width)

    def _guidance(self, parts: Parts, model: nn.Module, batch: int, device: Any) -> torch.Tensor | None:
        """`[model] guidance` for a guidance-distilled transformer (guidance_embeds), else none."""
        import torch

        if not getattr(getattr(model, "module", model).config, "guidance_embeds", False):
            return None
        return torch.full((batch,), parts.constants.get("guidance", 3.5), device=device, dtype=torch.float32)

    # --- ControlNet ------------------------------------------------------------------------

    def control_arguments(self, image: Any) -> dict[str, Any]:
        return {"control_image": image}

    def make_controlnet(self, parts: Parts, source: str | None, settings: MethodSettings | None = None) -> nn.Module:
        """QwenImageControlNetModel.from_transformer: the embeddings and the first
        `controlnet_double_blocks` blocks copied, the control input and each block's output
        projection zero-initialised (a new ControlNet changes nothing until it trains)."""
        import torch
        from diffusers import QwenImageControlNetModel

        if source is not None:
            return QwenImageControlNetModel.from_pretrained(source, dtype=torch.float32)
        config = parts.denoiser.config
        wanted = settings.controlnet_double_blocks if settings is not None else 4
        if wanted > config.num_layers:  # the default on a smaller base, or a config the plan could not read
            import logging

            logging.getLogger(__name__).warning(
                "method.controlnet_double_blocks = %d: the base's transformer has %d blocks; the ControlNet copies "
                "them all", wanted, config.num_layers)
        return QwenImageControlNetModel.from_transformer(
            parts.denoiser, num_layers=min(wanted, config.num_layers), attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads)

    def controlnet_residuals(
        self, parts: Parts, controlnet: nn.Module, inputs: ModelInputs, conditioning: torch.Tensor
    ) -> dict[str, Any]:
        """As QwenImageControlNetPipeline runs its ControlNet: the control image's packed,
        normalised latents (the posterior's mean here) beside the noisy ones."""
        import torch

        with torch.no_grad():  # (on the VAE's device, which a latent cache may have moved off the accelerator)
            control = self.encode_images(parts, conditioning * 2 - 1, None).to(inputs.noisy.device)
        dtype = inputs.noisy.dtype
        samples = controlnet(
            hidden_states=pack(inputs.noisy),
            controlnet_cond=pack(control.to(dtype)),
            timestep=inputs.timesteps / 1000,
            encoder_hidden_states=inputs.text["hidden_states"].to(dtype),
            encoder_hidden_states_mask=_mask(inputs.text),
            img_shapes=[[patches(inputs.noisy)]] * inputs.noisy.shape[0],
            return_dict=False,
        )
        return {"controlnet_block_samples": samples}

    def load_controlnet(self, path: str, dtype: Any) -> Any:
        from diffusers import QwenImageControlNetModel

        return QwenImageControlNetModel.from_pretrained(path, dtype=dtype)


def _mask(text: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The prompt's mask as the pipelines pass it: None when no token is padding."""
    mask = text["mask"]
    return None if bool(mask.all()) else mask


def patches(latents: torch.Tensor) -> tuple[int, int, int]:
    """(frames, rows, columns) of 2x2 patches: one entry of the transformer's img_shapes."""
    height, width = latents.shape[-2:]
    if height % PATCH or width % PATCH:
        raise ValueError(f"Qwen-Image packs latents in {PATCH}x{PATCH} patches: latents of {height}x{width} do not "
                         "divide (data.resolution must be a multiple of the VAE factor x 2)")
    return (1, height // PATCH, width // PATCH)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4), as QwenImagePipeline._pack_latents."""
    batch, channels, height, width = latents.shape
    grid = latents.reshape(batch, channels, height // PATCH, PATCH, width // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return grid.reshape(batch, (height // PATCH) * (width // PATCH), channels * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack`, the channels from the tokens' width."""
    batch, _, width_in = tokens.shape
    channels = width_in // PATCH**2
    grid = tokens.reshape(batch, height // PATCH, width // PATCH, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, channels, height, width)


FAMILY = QwenImage()
