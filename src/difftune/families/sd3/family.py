"""Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers"): a
rectified-flow MMDiT over patches of the latents, conditioned on a joint text sequence
(two CLIPs and T5) and on the two CLIPs' pooled embeddings.

As diffusers' StableDiffusion3Pipeline and its training scripts (train_dreambooth_lora_sd3.py,
train_controlnet_sd3.py):
- the prompt: CLIP-L's and CLIP-G's second-to-last hidden states (both tokenized to the
  first tokenizer's length) joined on channels, zero-padded to T5's width, then T5's last
  hidden states after them on the token axis, T5 at max_sequence_length (256, or the T5
  tokenizer's model_max_length if smaller, passed to every pipeline call); the pooled
  embedding is both CLIPs' projected text_embeds joined;
- the latents: the VAE's posterior, shifted then scaled (shift_factor, scaling_factor),
  as the pipeline decodes them; not packed: the transformer embeds its own patches;
- the time: the objective's sigma x 1000 as the transformer takes it, shifted by the
  scheduler's static `shift` (3.0 for SD3 / SD3.5), or by the token count where the
  scheduler's config says use_dynamic_shifting (the pipeline's calculate_shift);
- a ControlNet: SD3ControlNetModel.from_transformer (the first
  `method.controlnet_double_blocks` joint blocks), fed the control image's latents, its
  outputs added to the transformer's blocks (block_controlnet_hidden_states).
Every size comes from the configs: VAE factor, latent channels, patch size, text widths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from difftune.families.base import ModelInputs, Parts, device_of, dtype_of
from difftune.families.latent import LatentFamily
from difftune.families.sd3.facts import FACTS

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import nn

    from difftune.config import ModelConfig, ObjectiveConfig
    from difftune.method_settings import MethodSettings
    from difftune.objectives import Objective

MAX_SEQUENCE_LENGTH = 256
"""T5 tokens per prompt at most (StableDiffusion3Pipeline's default): the T5 tokenizer's
model_max_length below that, and every pipeline call gets the same max_sequence_length
(`generation_options`), so generation sees the padding training saw."""
PATCH = 2
"""The transformer's patch when its config does not say (SD3Transformer2DModel's default)."""


class StableDiffusion3(LatentFamily):
    facts = FACTS
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0")
    """The joint attention's image projections, as diffusers' SD3 LoRA script adapts them."""
    kohya_prefixes: dict[str, str] = {}
    """sd-scripts names SD3 modules in SAI's layout (fused qkv): not written yet."""
    kohya_unet_names = "diffusers"
    license = "other"  # the Stability AI Community License
    card_tags = ["sd3", "sd3-diffusers", "text-to-image"]
    trainable_text_encoder_names = ("text_encoder", "text_encoder_2")
    """diffusers' SD3 LoRA loader adapts the two CLIPs, never T5."""
    controlnet_class = "SD3ControlNetModel"
    attention_options = "joint_attention_kwargs"
    latent_patch = PATCH
    patch_in_config = True  # its transformer config.json says patch_size
    gpu_dtype = "bfloat16"  # SD3.5's T5 and transformer are run in bf16; fp16 overflows in T5

    def load(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        from dataclasses import replace

        return replace(self.load_parts(config, denoiser_in_memory),
                       trainable_text_encoder_names=self.trainable_text_encoder_names)

    def method_problems(self, method: MethodSettings, base: str, revision: str | None = None) -> list[str]:
        """A new SD3 ControlNet copies `controlnet_double_blocks` of the transformer's joint
        blocks: at least one, and at most all but the last (`copyable`); SD3 has no
        single-stream blocks."""
        from difftune.model_files import read_config

        if method.result != "controlnet" or method.controlnet is not None:
            return []
        problems = []
        default = type(method).model_fields
        if method.controlnet_single_blocks != default["controlnet_single_blocks"].default:
            problems.append("method.controlnet_single_blocks: an SD3 transformer has joint blocks only; "
                            "method.controlnet_double_blocks sets how many the ControlNet copies")
        wanted = method.controlnet_double_blocks
        if wanted == 0:
            problems.append("method.controlnet_double_blocks = 0: a ControlNet of no blocks adds nothing to the "
                            "transformer; copy at least one")
        config = read_config(base, f"{self.denoiser_name}/config.json", revision) or {}
        has = config.get("num_layers")
        if not isinstance(has, int):
            return problems
        if copyable(has) == 0:
            problems.append(f"method.kind = 'controlnet': the base's transformer has {has} joint block (num_layers in "
                            f"{self.denoiser_name}/config.json), whose text stream ends there, and an SD3 "
                            "ControlNet copies only blocks before the last")
        # a count left at its default (4) takes what a smaller base has, with a line (make_controlnet)
        elif wanted > copyable(has) and wanted != default["controlnet_double_blocks"].default:
            problems.append(f"method.controlnet_double_blocks = {wanted}: the base's transformer has {has} joint "
                            f"blocks (num_layers in {self.denoiser_name}/config.json), and a ControlNet copies at "
                            f"most {copyable(has)} (all but the last, whose text stream ends there)")
        return problems

    def objective(self, parts: Parts, config: ObjectiveConfig) -> Objective:
        from difftune.objectives import FlowMatching

        return FlowMatching(parts.noise_scheduler, config, self.shift_mu(parts), _patch(parts.denoiser))

    def shift_mu(self, parts: Parts) -> Callable[[int], float]:
        """StableDiffusion3Pipeline's calculate_shift (used only where the scheduler's config
        says use_dynamic_shifting; SD3 and SD3.5 shift by the static `shift`): mu linear in
        the token count between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
        config = parts.noise_scheduler.config

        def mu(tokens: int) -> float:
            base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.16)
            slope = (max_shift - base_shift) / (max_len - base_len)
            return base_shift + slope * (tokens - base_len)

        return mu

    # --- text ------------------------------------------------------------------------------

    def encode_prompts(self, parts: Parts, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch

        components = parts.components
        clip_length = components["tokenizer"].model_max_length  # the pipeline cuts both CLIPs there
        hidden, pooled = [], []
        for tokenizer, encoder in ((components["tokenizer"], components["text_encoder"]),
                                   (components["tokenizer_2"], components["text_encoder_2"])):
            ids = tokenizer(captions, padding="max_length", max_length=clip_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(device_of(encoder)), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        tokenizer, t5 = components["tokenizer_3"], components["text_encoder_3"]
        ids = tokenizer(captions, padding="max_length", max_length=sequence_length(tokenizer), truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        sequence = t5(ids.to(device_of(t5)))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip.to(sequence.device), (0, sequence.shape[-1] - clip.shape[-1]))
        return {"hidden_states": torch.cat([clip, sequence], dim=-2),
                "pooled": torch.cat(pooled, dim=-1).to(sequence.device)}

    def text_cache_identity(self, parts: Parts) -> dict[str, Any]:
        return {**super().text_cache_identity(parts),
                "max_sequence_length": sequence_length(parts.components["tokenizer_3"])}

    def generation_options(self, pipeline: Any) -> dict[str, Any]:
        return {"max_sequence_length": sequence_length(pipeline.tokenizer_3)}

    # --- the denoiser ----------------------------------------------------------------------

    def predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor:
        transformer = parts.denoiser  # possibly wrapped (DDP): no .config or .dtype there
        dtype = dtype_of(transformer)
        height, width = inputs.noisy.shape[-2:]
        patch = _patch(transformer)
        if height % patch or width % patch:
            raise ValueError(f"SD3 embeds {patch}x{patch} patches: latents of {height}x{width} do not divide "
                             f"(data.resolution must be a multiple of the VAE factor x {patch})")
        samples = inputs.extra.get("block_controlnet_hidden_states")
        return transformer(
            hidden_states=inputs.noisy.to(dtype),
            timestep=inputs.timesteps,  # in [0, 1000] as the pipeline passes the scheduler's
            encoder_hidden_states=inputs.text["hidden_states"].to(dtype),
            pooled_projections=inputs.text["pooled"].to(dtype),
            block_controlnet_hidden_states=None if samples is None else [s.to(dtype) for s in samples],
            return_dict=False,
        )[0]

    # --- pipelines and what leaves a run ----------------------------------------------------

    def control_arguments(self, image: Any) -> dict[str, Any]:
        return {"control_image": image}

    def make_controlnet(self, parts: Parts, source: str | None, settings: MethodSettings | None = None) -> nn.Module:
        """SD3ControlNetModel.from_transformer, as diffusers' train_controlnet_sd3.py: the
        position and time-text embeddings, the context embedder and the first
        `controlnet_double_blocks` joint blocks copied, a zero-initialised input for the
        control latents (no extra channels) and zero-initialised output projections. Its
        config says it takes the pooled prompt and shifted control latents
        (force_zeros_for_pooled_projection false), so StableDiffusion3ControlNetPipeline
        gives it what training gave it."""
        import torch
        from diffusers import SD3ControlNetModel

        if source is not None:
            net = SD3ControlNetModel.from_pretrained(source, dtype=torch.float32)
            if net.pos_embed is None:
                raise ValueError(f"method.controlnet = {source!r} borrows the transformer's position embedding "
                                 "(use_pos_embed false, as SD3.5 Large's ControlNets): difftune does not train "
                                 "such a ControlNet")
            return net
        transformer = parts.denoiser
        config = transformer.config
        wanted = settings.controlnet_double_blocks if settings is not None else 4
        most = copyable(config.num_layers)
        if wanted > most:  # the default on a smaller base, or a config the plan could not read
            import logging

            logging.getLogger(__name__).warning(
                "method.controlnet_double_blocks = %d: the base's transformer has %d joint blocks; the ControlNet "
                "copies all but the last (%d)", wanted, config.num_layers, most)
        # from_transformer writes num_layers into the model's own config: it gets a copy
        return SD3ControlNetModel.from_transformer(
            _WithConfig(transformer, force_zeros_for_pooled_projection=False),
            num_layers=min(wanted, most), num_extra_conditioning_channels=0)

    def controlnet_residuals(
        self, parts: Parts, controlnet: nn.Module, inputs: ModelInputs, conditioning: torch.Tensor
    ) -> dict[str, Any]:
        """As StableDiffusion3ControlNetPipeline runs an SD3ControlNetModel: the control
        image's latents (the posterior's mean here), shifted by the VAE's shift_factor unless
        the ControlNet's config forces zeros for the pooled projection (InstantX's, trained
        unshifted on zeros), the prompt where it has a context embedder."""
        import torch

        config = getattr(controlnet, "module", controlnet).config
        zeros = config.force_zeros_for_pooled_projection
        with torch.no_grad():  # (on the VAE's device, which a latent cache may have moved off the accelerator)
            mean, _ = self.latent_distribution(parts, conditioning * 2 - 1)
            vae = parts.vae.config
            shift = 0.0 if zeros else (getattr(vae, "shift_factor", None) or 0.0)
            control = ((mean - shift) * vae.scaling_factor).to(inputs.noisy.device)
        dtype = inputs.noisy.dtype
        pooled = inputs.text["pooled"].to(dtype)
        samples = controlnet(
            hidden_states=inputs.noisy,
            controlnet_cond=control.to(dtype),
            timestep=inputs.timesteps,
            encoder_hidden_states=inputs.text["hidden_states"].to(dtype) if config.joint_attention_dim else None,
            pooled_projections=torch.zeros_like(pooled) if zeros else pooled,
            return_dict=False,
        )[0]
        return {"block_controlnet_hidden_states": samples}

    def load_controlnet(self, path: str, dtype: Any) -> Any:
        from diffusers import SD3ControlNetModel

        return SD3ControlNetModel.from_pretrained(path, dtype=dtype)


class _WithConfig:
    """A transformer seen with a copy of its config (some entries replaced), so that
    SD3ControlNetModel.from_transformer, which writes into the config it reads, leaves the
    transformer's own as it was."""

    def __init__(self, model: Any, **entries: Any) -> None:
        from diffusers.configuration_utils import FrozenDict

        self._model = model
        self.config = FrozenDict({**model.config, **entries})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def copyable(blocks: int) -> int:
    """The joint blocks a ControlNet can copy from a transformer of `blocks`: all but the
    last, whose text stream ends there (context_pre_only: other weights, and no residual
    is added to it), while every block of an SD3ControlNetModel carries the text on."""
    return max(blocks - 1, 0)


def sequence_length(tokenizer: Any) -> int:
    return min(MAX_SEQUENCE_LENGTH, tokenizer.model_max_length)


def _patch(transformer: Any) -> int:
    """The transformer's patch_size (through a wrapper such as DDP, which has no .config)."""
    return getattr(getattr(transformer, "module", transformer).config, "patch_size", PATCH)


FAMILY = StableDiffusion3()
