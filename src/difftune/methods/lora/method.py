"""LoRA (Hu et al. 2021): low-rank adapters on the denoiser's attention projections
(and optionally the text encoder's), through peft; only the adapters train and are saved.
With variant "dora" (Liu et al. 2024), each adapted weight also learns its magnitude;
variants "lokr" and "loha" train peft's LoKr and LoHa (LyCORIS' Kronecker and Hadamard
products) instead.

The result of LoRA and DoRA is diffusers' `pytorch_lora_weights.safetensors`, which
`pipe.load_lora_weights` reads. diffusers reads no LoKr or LoHa file, so theirs is
peft's own: `final/<part>/adapter_config.json` (the peft config, as JSON that
`PeftConfig.from_peft_type(**config)` reads) and `final/<part>/adapter_model.safetensors`
(get_peft_model_state_dict), for each trained part (results.AdapterResult attaches them).
`difftune export lora --format kohya` converts either (LoKr/LoHa: LyCORIS names).
Checkpoints hold each part's adapter state in peft's names, whatever the variant.
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    restore_pretrained,
    same_samples,
    store_pretrained,
)
from difftune.methods.full.method import generate_text_to_image

from difftune.methods.lora.spec import lora_result

if TYPE_CHECKING:
    from peft import PeftConfig

    from difftune.methods.lora.spec import LoraSettings, OptionalLora

ADAPTER_FILE = "adapter_model.safetensors"


def lora_config(settings: LoraSettings, targets: list[str] | tuple[str, ...]) -> PeftConfig:
    """The peft config of the settings' variant: LoraConfig (LoRA, DoRA), LoKrConfig or
    LoHaConfig (rank r, alpha; peft's own init, no dropout: the settings refuse the others)."""
    # Imported here: peft takes ~4 s to import (it loads transformers' models and
    # bitsandbytes, which compiles), and only runs with adapters need it.
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = settings.alpha if settings.alpha is not None else settings.rank
    if settings.variant in ("lokr", "loha"):
        lycoris = LoKrConfig if settings.variant == "lokr" else LoHaConfig
        return lycoris(r=settings.rank, alpha=alpha, target_modules=list(targets))
    return LoraConfig(
        r=settings.rank,
        lora_alpha=alpha,
        lora_dropout=settings.dropout,
        init_lora_weights="gaussian" if settings.init == "gaussian" else True,
        target_modules=list(targets),
        use_dora=settings.variant == "dora",
    )


def add_lora(module: nn.Module, config: PeftConfig) -> nn.Module:
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


def adapter_config_json(config: PeftConfig) -> dict[str, Any]:
    """A peft config as JSON data that `PeftConfig.from_peft_type(**data)` reads back: sets
    (target_modules) as sorted lists, enums (peft_type) as their values; inference_mode
    true, as peft's save_pretrained writes it (a loaded adapter does not train)."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return plain(value.value)
        if isinstance(value, (set, frozenset)):
            return sorted(plain(v) for v in value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return {**plain(config.to_dict()), "inference_mode": True}


def save_adapters(out_dir: Path, adapted: dict[str, nn.Module]) -> None:
    """peft's own files for each adapted part: `<part>/adapter_config.json` and
    `<part>/adapter_model.safetensors` (results.AdapterResult reads them)."""
    from difftune.results import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    for name, module in adapted.items():
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file(adapter_state(module), folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        text = json.dumps(adapter_config_json(module.peft_config["default"]), indent=2, sort_keys=True)
        (folder / ADAPTER_CONFIG).write_text(text + "\n", encoding="utf-8")


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
        if lora_result(self.settings) == "adapter":  # LoKr, LoHa: no file diffusers' LoRA loader reads
            save_adapters(out_dir, trained)
        else:
            family.save_lora(out_dir, trained)

    usage = family_usage

    generate = staticmethod(generate_text_to_image)


class AdaptersOrWeights:
    """Checkpoints of a method that trains adapters when [method.lora] is given (its `lora`)
    and whole weights otherwise (Control, edit): the adapter file, or a from_pretrained folder."""

    lora: Lora | None

    def store(self, name: str, module: nn.Module, folder: Path) -> None:
        (self.lora.store if self.lora is not None else store_pretrained)(name, module, folder)

    def restore(self, name: str, module: nn.Module, folder: Path) -> None:
        """Into the module as build() made it (Control: its input projection widened already)."""
        (self.lora.restore if self.lora is not None else restore_pretrained)(name, module, folder)
