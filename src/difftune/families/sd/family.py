"""Stable Diffusion 1.x / 2.x: CLIP text encoder, KL VAE, UNet2DConditionModel.

Also the base of the other UNet latent-diffusion families (SDXL): a subclass names its
parts and overrides what differs (text encoders, added conditioning, pipelines).
Heavy libraries are imported inside the functions (see families/base.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftune.families.base import ModelInputs, Parts, dtype_of
from difftune.families.latent import LatentFamily
from difftune.families.sd.facts import FACTS

if TYPE_CHECKING:
    import torch
    from torch import nn

    from difftune.config import ModelConfig, ObjectiveConfig
    from difftune.method_settings import MethodSettings
    from difftune.objectives import Objective

# The ControlNet conditioning embedding downsamples by 2 per channel stage after the
# first; its stride must equal the VAE's or the residuals miss the latent grid.
_CONDITIONING_CHANNELS = (16, 32, 96, 256)


class StableDiffusion(LatentFamily):
    facts = FACTS
    scheduler_class = "DDPMScheduler"
    tokenizer_names = ("tokenizer",)
    """One tokenizer per text encoder, in the same order."""
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet attention projections, as diffusers' SD LoRA scripts adapt."""
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    kohya_unet_names = "diffusers"
    """How sd-scripts names the family's UNet modules in LoRA keys: by diffusers' paths, or
    by the "original" (LDM/SGM) layout's."""
    license = "creativeml-openrail-m"
    card_tags = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image"]
    pipeline_options: dict[str, Any] = {"safety_checker": None, "feature_extractor": None,
                                        "requires_safety_checker": False}
    """Keyword arguments every pipeline of the family is built with."""
    pipeline_multiple = 8
    """StableDiffusion(XL)Pipeline.check_inputs refuses sizes that are not multiples of 8."""

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
        parts = self.load_parts(config, denoiser_in_memory)
        lengths = {parts.components[name].model_max_length for name in self.tokenizer_names}
        if len(lengths) > 1:  # model.tokenizer of another length than the pipeline's second one
            from difftune.paths import PathError

            raise PathError(f"the tokenizers ({', '.join(self.tokenizer_names)}) cut prompts at different lengths "
                            f"{sorted(lengths)}: they must agree (model.tokenizer?)")
        return parts

    def objective(self, parts: Parts, config: ObjectiveConfig) -> Objective:
        from difftune.objectives import DiscreteDiffusion

        return DiscreteDiffusion(parts.noise_scheduler, config)

    # --- text ------------------------------------------------------------------------------

    def encode_prompts(self, parts: Parts, captions: list[str]) -> dict[str, torch.Tensor]:
        encoder = parts.components["text_encoder"]
        # The encoder may be wrapped for training (DDP): ask a parameter for the device.
        ids = self.token_ids(parts.components["tokenizer"], captions).to(next(encoder.parameters()).device)
        return {"hidden_states": encoder(ids, return_dict=False)[0]}

    # --- images ----------------------------------------------------------------------------

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

    def make_controlnet(self, parts: Parts, source: str | None, settings: MethodSettings | None = None) -> nn.Module:
        """A ControlNet copied from the UNet's encoder (or loaded from `source`), taking an
        RGB conditioning image through an embedding of the VAE's stride."""
        import torch
        from diffusers import ControlNetModel

        if source is not None:
            return ControlNetModel.from_pretrained(source, dtype=torch.float32)
        stages = self.vae_scale_factor(parts).bit_length()
        return ControlNetModel.from_unet(
            parts.denoiser,
            conditioning_embedding_out_channels=_CONDITIONING_CHANNELS[:stages],
            conditioning_channels=3,
        )

    def controlnet_residuals(
        self, parts: Parts, controlnet: nn.Module, inputs: ModelInputs, conditioning: torch.Tensor
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

    def sampler(self, scheduler: Any) -> Any:
        """UniPC (fast multistep sampling) over the DDPM training schedule."""
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler.from_config(scheduler.config)

    def control_arguments(self, image: Any) -> dict[str, Any]:
        return {"image": image}

    def load_controlnet(self, path: str, dtype: Any) -> Any:
        from diffusers import ControlNetModel

        return ControlNetModel.from_pretrained(path, dtype=dtype)

    def export_single_file(self, pipeline_dir: Path, out_file: Path, half: bool) -> Path:
        from difftune.families.sd.single_file import export_single_file

        return export_single_file(pipeline_dir, out_file, half=half)


FAMILY = StableDiffusion()
