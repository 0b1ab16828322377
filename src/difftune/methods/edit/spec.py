"""Edit training as the catalog lists it."""

from __future__ import annotations

from typing import ClassVar, Literal

from difftune.catalog import MethodSpec
from difftune.methods.lora.spec import OptionalLora


class EditMethod(OptionalLora):
    """kind = "edit": reference image(s) plus an instruction in, the edited image out (FLUX.1
    Kontext, Qwen-Image-Edit). The references' latents join the denoiser's token sequence
    with position ids of their own, as the family's edit pipeline does at inference, and
    the loss is on the target's tokens. Rows without a reference train as text-to-image.
    The whole denoiser trains, or adapters with [method.lora]; final/ is the family's edit
    pipeline, or a LoRA file its load_lora_weights reads."""

    kind: Literal["edit"] = "edit"

    needs_conditioning: ClassVar[bool] = True
    takes_references: ClassVar[bool] = True

    @property
    def result(self) -> str:
        return "edit_lora" if self.uses_lora else "edit"


SPEC = MethodSpec(kind="edit", description="reference image + instruction -> edited image (full, or LoRA)",
                  settings=EditMethod, needs=frozenset({"edit"}), factory="difftune.methods.edit.method:Edit")
