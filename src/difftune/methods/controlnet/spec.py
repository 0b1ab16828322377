"""ControlNet as the catalog lists it (the default kind)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from difftune.catalog import MethodSpec
from difftune.method_settings import MethodSettings
from difftune.strict import PathText

if TYPE_CHECKING:
    from difftune.catalog import FamilyFacts

BLOCK_COUNTS = ("controlnet_double_blocks", "controlnet_single_blocks")


class ControlNetMethod(MethodSettings):
    """kind = "controlnet": a trainable copy of the denoiser's first blocks whose outputs
    steer the frozen base; a ControlNet folder out."""

    kind: Literal["controlnet"] = "controlnet"
    controlnet: PathText | None = None
    """Existing ControlNet (Hub id or folder) to continue from; None starts from the denoiser."""
    controlnet_double_blocks: int = Field(4, ge=0)
    """Transformer families' ControlNet: the dual-stream (Flux, diffusers' --num_double_layers)
    or joint (SD3, --num_layers) blocks copied; UNet families copy the whole encoder."""
    controlnet_single_blocks: int = Field(4, ge=0)
    """Flux ControlNet: single-stream blocks copied (--num_single_layers); SD3 has none."""

    needs_conditioning: ClassVar[bool] = True
    RESULT: ClassVar[str] = "controlnet"
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("controlnet",)

    def family_problem(self, family: FamilyFacts) -> str | None:
        """Block counts are for a family whose ControlNet copies chosen blocks; a new one
        copies some (none would steer nothing); a continued one keeps its own."""
        blocks = [name for name in BLOCK_COUNTS if getattr(self, name) != type(self).model_fields[name].default]
        if blocks and not family.controlnet_blocks:
            return (f"method.{blocks[0]}: family {family.name!r} copies its whole encoder into a ControlNet; "
                    "the block counts are for transformer families")
        if not family.controlnet_blocks:
            return super().family_problem(family)
        if self.controlnet is not None and blocks:
            return (f"method.{blocks[0]}: method.controlnet continues an existing ControlNet, which keeps its "
                    "own blocks; leave the block counts unset")
        if self.controlnet is None and self.controlnet_double_blocks + self.controlnet_single_blocks == 0:
            return ("method.controlnet_double_blocks and controlnet_single_blocks are both 0: a ControlNet of no "
                    "blocks adds nothing to the transformer; copy at least one")
        return super().family_problem(family)

    def model_folders(self) -> dict[str, str]:
        return {"method.controlnet": self.controlnet} if self.controlnet else {}


SPEC = MethodSpec(kind="controlnet", description="a ControlNet beside the frozen base", settings=ControlNetMethod,
                  needs=frozenset({"controlnet"}), factory="difftune.methods.controlnet.method:ControlNet",
                  default=True)
