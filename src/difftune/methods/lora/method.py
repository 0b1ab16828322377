"""LoRA (Hu et al. 2021): low-rank adapters on the denoiser's attention projections
(and optionally the text encoder's), through peft; only the adapters train and are saved.
With variant "dora" (Liu et al. 2024), each adapted weight also learns its magnitude.

The result is diffusers' `pytorch_lora_weights.safetensors`, which
`pipe.load_lora_weights` reads; `difftune export lora --format kohya` converts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from difftune.families.base import Family, Parts
from difftune.methods.base import (
    FromSettings,
    Trained,
    denoiser_and_text_encoders,
    family_usage,
    freeze,
    mean_loss,
    no_extra_inputs,
    same_samples,
)
from difftune.methods.full.method import generate_text_to_image

if TYPE_CHECKING:
    from peft import LoraConfig

    from difftune.methods.lora.spec import LoraSettings, OptionalLora

ADAPTER_FILE = "adapter_model.safetensors"


def lora_config(settings: LoraSettings, targets: list[str] | tuple[str, ...]) -> LoraConfig:
    # Imported here: peft takes ~4 s to import (it loads transformers' models and
    # bitsandbytes, which compiles), and only runs with adapters need it.
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian" if settings.init == "gaussian" else True,
        target_modules=list(targets),
        use_dora=settings.variant == "dora",
    )


def add_lora(module: nn.Module, config: LoraConfig) -> nn.Module:
    """Inject adapters; only they require grad, and they stay fp32 (the base may be
    cast to the compute dtype later)."""
    module.add_adapter(config)
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    # from_pretrained returns eval mode; dropout and gradient checkpointing need train mode
    return module.train()


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's naming, contiguous (safetensors needs it)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(module, save_embedding_layers=False).items()}


class Lora(FromSettings):
    floor_settings = None
    card_tags = ["lora"]

    def __init__(self, config: OptionalLora) -> None:
        assert config.lora is not None  # kind "lora" fills in defaults; the others train adapters when given
        super().__init__(config)
        self.settings: LoraSettings = config.lora

    def build(self, family: Family, parts: Parts) -> Trained:
        freeze(parts)
        chosen = denoiser_and_text_encoders(parts, self.config.trains_text_encoder)
        denoiser_targets = self.settings.target_modules or family.lora_targets
        return {name: add_lora(module, lora_config(self.settings, denoiser_targets if name == parts.denoiser_name
                                                   else self.settings.text_encoder_target_modules))
                for name, module in chosen.items()}

    training_data = staticmethod(same_samples)

    condition = staticmethod(no_extra_inputs)

    reduce = staticmethod(mean_loss)

    def store(self, name: str, module: nn.Module, folder: Path) -> None:
        (folder / name).mkdir(parents=True, exist_ok=True)
        save_file(adapter_state(module), folder / name / ADAPTER_FILE)

    def restore(self, name: str, module: nn.Module, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(module, load_file(folder / name / ADAPTER_FILE))
        if result is not None and getattr(result, "unexpected_keys", None):
            raise ValueError(f"{folder / name / ADAPTER_FILE}: keys the model lacks: {result.unexpected_keys[:5]}")

    def save(self, family: Family, parts: Parts, trained: Trained, out_dir: Path) -> None:
        family.save_lora(out_dir, trained)

    usage = family_usage

    generate = staticmethod(generate_text_to_image)
