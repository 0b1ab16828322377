"""CogView4 (Zhipu AI 2025): a flow-matching transformer over 2x2 patches of the latents,conditioned on the GLM encoder's second-to-last hidden states and on each image's
original size, crop top-left and target size.

As diffusers' CogView4Pipeline and examples/cogview4-control/train_control_cogview4.py:
- the prompt: the batch tokenized to its longest caption, then padded on the left with
  the pad token to a multiple of 16 tokens, as the pipeline pads it; GLM's hidden states
  depend on that padding, so a caption's embedding depends on its batch and the text
  cache is refused;
- the time: the objective's sigma x 1000, shifted by the token count with mu =
  sqrt(tokens / base_image_seq_len) * max_shift + base_shift, through the scheduler's
  linear time shift;
- the size conditioning: each sample's geometry (original size, crop, target size);
- bf16 or fp32 only: CogView4 overflows in fp16, refused when the config loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from difftune.families.base import ModelInputs, Parts, device_of, dtype_of
from difftune.families.latent import LatentFamily
from difftune.families.cogview4.facts import FACTS

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from difftune.config import ModelConfig, ObjectiveConfig
    from difftune.objectives import Objective

PATCH = 2
"""The transformer's patch when its config does not say (CogView4Transformer2DModel's default)."""
PIPELINE_MULTIPLE = 16
"""CogView4Pipeline and CogView4ControlPipeline refuse sizes that are not multiples of 16."""
MAX_SEQUENCE_LENGTH = 1024
"""Where CogView4Pipeline cuts a prompt (its max_sequence_length default)."""
TOKEN_MULTIPLE = 16
"""The pipeline pads every prompt on the left to a multiple of this many tokens."""


class CogView4(LatentFamily):
    facts = FACTS
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    tokenizer_names = ("tokenizer",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    kohya_prefixes: dict[str, str] = {}
    kohya_unet_names = "diffusers"
    license = "apache-2.0"
    card_tags = ["cogview4", "text-to-image"]
    input_projection = "patch_embed.proj"
    latent_patch = PATCH
    patch_in_config = True  # its transformer config.json says patch_size
    pipeline_multiple = PIPELINE_MULTIPLE
    attention_options = "attention_kwargs"
    gpu_dtype = "bfloat16"


    def load(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        from dataclasses import replace

        return replace(self.load_parts(config, denoiser_in_memory), trainable_text_encoder_names=())

    def objective(self, parts: Parts, config: ObjectiveConfig) -> Objective:
        from difftune.objectives import FlowMatching

        return FlowMatching(parts.noise_scheduler, config, self.shift_mu(parts), _patch(parts.denoiser))

    def shift_mu(self, parts: Parts) -> Callable[[int], float]:
        """CogView4Pipeline's calculate_shift: sqrt(tokens / base_image_seq_len) * max_shift + base_shift."""
        config = parts.noise_scheduler.config

        def mu(tokens: int) -> float:
            return (tokens / config.base_image_seq_len) ** 0.5 * config.max_shift + config.base_shift

        return mu

    # --- text ------------------------------------------------------------------------------

    def encode_prompts(self, parts: Parts, captions: list[str]) -> dict[str, torch.Tensor]:
        import torch

        tokenizer, encoder = parts.components["tokenizer"], parts.components["text_encoder"]
        ids = tokenizer(captions, padding="longest", max_length=MAX_SEQUENCE_LENGTH, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        pad = (TOKEN_MULTIPLE - ids.shape[1] % TOKEN_MULTIPLE) % TOKEN_MULTIPLE
        if pad:
            ids = torch.cat([torch.full((ids.shape[0], pad), tokenizer.pad_token_id, dtype=ids.dtype), ids], dim=1)
        return {"hidden_states": encoder(ids.to(device_of(encoder)), output_hidden_states=True).hidden_states[-2]}

    # --- the denoiser ----------------------------------------------------------------------

    def predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor:
        import torch

        transformer = parts.denoiser
        dtype, device = dtype_of(transformer), inputs.noisy.device
        batch, _, height, width = inputs.noisy.shape
        patch = _patch(transformer)
        if height % patch or width % patch:
            raise ValueError(f"CogView4 embeds {patch}x{patch} patches: latents of {height}x{width} do not divide")
        if inputs.geometry is None:  # every sample at its target size, in pixels
            h, w = height * self.vae_scale_factor(parts), width * self.vae_scale_factor(parts)
            geometry = torch.tensor([[h, w, 0, 0, h, w]] * batch, device=device)
        else:
            geometry = inputs.geometry.to(device)
        sizes = geometry.to(dtype)
        return transformer(
            hidden_states=inputs.noisy.to(dtype),
            encoder_hidden_states=inputs.text["hidden_states"].to(dtype),
            timestep=inputs.timesteps.to(dtype),
            original_size=sizes[:, 0:2],
            target_size=sizes[:, 4:6],
            crop_coords=sizes[:, 2:4],
            return_dict=False,
        )[0]

    def widened_config(self, config: Any) -> dict[str, Any]:
        """Twice the latent channels in; the output as before (CogView4ControlPipeline reads
        the latent channels as in_channels / 2)."""
        return {"in_channels": config.in_channels * 2, "out_channels": config.out_channels}

    def control_arguments(self, image: Any) -> dict[str, Any]:
        return {"control_image": image}


def _patch(transformer: Any) -> int:
    """The transformer's patch_size (through a wrapper such as DDP, which has no .config)."""
    return getattr(getattr(transformer, "module", transformer).config, "patch_size", PATCH)


FAMILY = CogView4()
