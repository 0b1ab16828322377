"""Channel-concat Control as the catalog lists it."""

from __future__ import annotations

from typing import ClassVar, Literal

from difftune.catalog import MethodSpec
from difftune.methods.lora.spec import OptionalLora


class ControlMethod(OptionalLora):
    """kind = "control": the control image's latents concatenated to the denoiser's input
    (its input projection widened, the new inputs zero-initialised); the whole denoiser
    trains, or adapters with [method.lora] (Control-LoRA)."""

    kind: Literal["control"] = "control"

    needs_conditioning: ClassVar[bool] = True

    @property
    def result(self) -> str:
        return "control_lora" if self.uses_lora else "control"


SPEC = MethodSpec(kind="control", description="channel-concat Control (full, or LoRA)", settings=ControlMethod,
                  needs=frozenset({"control"}), factory="difftune.methods.control.method:Control")
