"""LoRA as the catalog lists it: its [method] settings ([method.lora], shared with the
methods that train adapters optionally) and what it needs of a family."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, ValidationInfo, field_validator

from difftune.catalog import MethodSpec
from difftune.method_settings import MethodSettings, TextEncoderOption
from difftune.strict import Section

if TYPE_CHECKING:
    from difftune.catalog import FamilyFacts


ADAPTER_VARIANTS = ("lokr", "loha")
"""The variants whose result is peft's own adapters ("adapter"), not a LoRA file."""


class LoraSettings(Section):
    """Low-rank adapters (Hu et al. 2021) through peft; only adapter weights train."""

    variant: Literal["lora", "dora", "lokr", "loha"] = "lora"
    """"lora"; "dora" (Liu et al. 2024: each adapted weight's direction and magnitude
    learned apart, peft's use_dora), loaded by diffusers' load_lora_weights as a LoRA is
    and exported to the kohya format with its `dora_scale`; "lokr" (LyCORIS' LoKr, peft's
    LoKrConfig: the weight change is a Kronecker product of two small factors, the larger
    one of rank `rank` unless full rank is smaller) or "loha" (LoHa, peft's LoHaConfig:
    the Hadamard product of two rank-`rank` products, FedPara). diffusers' load_lora_weights
    reads neither: final/<part>/ holds peft's adapter_config.json and
    adapter_model.safetensors, which peft adds to the pipeline's part
    (`add_adapter(PeftConfig.from_peft_type(**config))` + set_peft_model_state_dict; the
    model card and `difftune generate --lora` do it), and `difftune export lora --format
    kohya` writes one LyCORIS file (ComfyUI, A1111). Control-LoRA (kind "control") takes
    "lora" and "dora" only."""
    rank: int = Field(4, gt=0)
    """The adapters' rank (peft's r)."""
    alpha: float | None = Field(None, gt=0)
    """Scale numerator (alpha / rank; peft's lora_alpha, or alpha for LoKr/LoHa); None
    means alpha = rank, as in diffusers' scripts."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input (peft's lora_dropout). LoRA and DoRA only: peft's
    LoKr and LoHa (as LyCORIS') have no input dropout, so more than 0 is refused for them."""
    init: Literal["gaussian", "kaiming"] = "gaussian"
    """peft init_lora_weights: "gaussian" as diffusers' SD scripts, "kaiming" is peft's default.
    LoRA and DoRA only: LoKr and LoHa start as peft (and LyCORIS) start them, one factor
    zero so that the adapter changes nothing before the first step; "kaiming" is refused
    for them and the default is not used."""
    target_modules: list[str] | None = None
    """Module names to adapt; None takes the family's (SD UNet: to_q, to_k, to_v, to_out.0)."""
    text_encoder_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]
    """Text-encoder modules adapted when method.train_text_encoder is true."""

    @field_validator("dropout")
    @classmethod
    def _dropout_is_lora_s(cls, value: float, info: ValidationInfo) -> float:
        variant = info.data.get("variant")
        if value > 0 and variant in ADAPTER_VARIANTS:
            raise ValueError(f"variant {variant!r} has no input dropout (peft's LoKr and LoHa, as LyCORIS', "
                             "have none); leave dropout at 0, or train variant 'lora' or 'dora'")
        return value

    @field_validator("init")
    @classmethod
    def _init_is_lora_s(cls, value: str, info: ValidationInfo) -> str:
        variant = info.data.get("variant")
        if value != "gaussian" and variant in ADAPTER_VARIANTS:
            raise ValueError(f"init chooses how a LoRA's matrices start; variant {variant!r} starts as peft and "
                             "LyCORIS start it (one factor zero: no change before the first step); leave init out")
        return value

    def quantize_problem(self, quantize: str) -> str | None:
        """Why these adapters cannot train on a base held in `quantize` (model.quantize), or
        None. peft's LoKr and LoHa reshape their delta to the base layer's weight shape,
        which NF4 packs two to a byte (bitsandbytes' Params4bit): the first step fails.
        int8 and fp8 keep the shape, and train."""
        if quantize == "nf4" and self.variant in ADAPTER_VARIANTS:
            return (f"model.quantize: 'nf4' packs the frozen weights that peft's {self.variant!r} adapters "
                    "(method.lora.variant) take their shape from; quantize to 'int8' or 'fp8', or train variant "
                    "'lora' or 'dora'")
        return None


def lora_result(settings: LoraSettings) -> str:
    """What final/ holds for these adapters (a results.Result kind): "lora", diffusers'
    LoRA file, for LoRA and DoRA; "adapter", peft's folders, for LoKr and LoHa."""
    return "adapter" if settings.variant in ADAPTER_VARIANTS else "lora"


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
        if self.lora is not None and self.lora.variant in ADAPTER_VARIANTS and self.result not in ("adapter", "lora"):
            # a result made with adapters that is not a plain set of them (a Control-LoRA:
            # diffusers' control pipeline widens its input projection as it reads a LoRA file)
            return (f"method.lora.variant: kind {self.kind!r} with {self.lora.variant!r} adapters would make a "
                    f"{self.result!r} result, which diffusers' load_lora_weights loads, and it reads LoRA and DoRA "
                    "weights only, not peft's LoKr and LoHa adapters; use variant 'lora' or 'dora'")
        return super().family_problem(family)


class AdaptersOut:
    """The traits of a method whose `lora` table always holds the adapters it trains, and
    whose result is them: a LoRA file (LoKr, LoHa: peft's adapter folders). Listed before
    the settings base (a plain class: pydantic takes no field from it)."""

    RESULT = "lora"

    @property
    def result(self) -> str:
        return lora_result(self.lora)

    @property
    def uses_lora(self) -> bool:
        return True


class LoraMethod(AdaptersOut, TextEncoderOption):
    """kind = "lora": adapters on the denoiser (and the text encoders with
    train_text_encoder); a LoRA file out (LoKr, LoHa: peft's adapter folders)."""

    kind: Literal["lora"] = "lora"
    lora: LoraSettings = LoraSettings()
    """Adapter settings (the defaults when the table is absent)."""


SPEC = MethodSpec(kind="lora", description="LoRA adapters (peft: LoRA, DoRA, LoKr, LoHa)", settings=LoraMethod,
                  needs=frozenset({"lora"}), factory="difftune.methods.lora.method:Lora")
