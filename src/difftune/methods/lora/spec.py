"""LoRA as the catalog lists it: its [method] settings ([method.lora], shared with the
methods that train adapters optionally) and what it needs of a family."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from difftune.catalog import MethodSpec
from difftune.methods.settings import MethodSettings, TextEncoderOption
from difftune.strict import Section

if TYPE_CHECKING:
    from difftune.catalog import FamilyFacts


class LoraSettings(Section):
    """Low-rank adapters (Hu et al. 2021) through peft; only adapter weights train."""

    variant: Literal["lora", "dora"] = "lora"
    """"lora"; "dora" (Liu et al. 2024: each adapted weight's direction and magnitude
    learned apart, peft's use_dora), loaded by diffusers' load_lora_weights as a LoRA is
    and exported to the kohya format with its `dora_scale`."""
    rank: int = Field(4, gt=0)
    alpha: float | None = Field(None, gt=0)
    """Scale numerator (alpha / rank); None means alpha = rank, as in diffusers' scripts."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init: Literal["gaussian", "kaiming"] = "gaussian"
    """peft init_lora_weights: "gaussian" as diffusers' SD scripts, "kaiming" is peft's default."""
    target_modules: list[str] | None = None
    """Module names to adapt; None takes the family's (SD UNet: to_q, to_k, to_v, to_out.0)."""
    text_encoder_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]
    """Text-encoder modules adapted when method.train_text_encoder is true."""



class OptionalLora(MethodSettings):
    """For methods that train adapters instead of whole weights when [method.lora] is given."""

    lora: LoraSettings | None = None
    """Adapter settings; without them every weight trains."""

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None

    @property
    def trains_every_weight(self) -> bool:
        return self.lora is None

    def family_problem(self, family: FamilyFacts) -> str | None:
        if self.lora is not None and "lora" not in family.capabilities:
            return f"[method.lora]: family {family.name!r} trains no LoRA adapters"
        return super().family_problem(family)


class LoraMethod(TextEncoderOption):
    """kind = "lora": adapters on the denoiser (and the text encoders with
    train_text_encoder); a LoRA file out."""

    kind: Literal["lora"] = "lora"
    lora: LoraSettings = LoraSettings()
    """Adapter settings (the defaults when the table is absent)."""

    RESULT: ClassVar[str] = "lora"

    @property
    def uses_lora(self) -> bool:
        return True


SPEC = MethodSpec(kind="lora", description="LoRA adapters (peft): a LoRA file", settings=LoraMethod,
                  needs=frozenset({"lora"}), factory="difftune.methods.lora.method:Lora")
