"""Full fine-tuning as the catalog lists it."""

from __future__ import annotations

from typing import Literal

from difftune.catalog import MethodSpec
from difftune.method_settings import TextEncoderOption


class FullMethod(TextEncoderOption):
    """kind = "full": every denoiser weight trains (and the text encoders with
    train_text_encoder); a whole pipeline out."""

    kind: Literal["full"] = "full"

    @property
    def trains_every_weight(self) -> bool:
        return True


SPEC = MethodSpec(kind="full", description="every weight of the denoiser: a whole pipeline", settings=FullMethod,
                  needs=frozenset(), factory="difftune.methods.full.method:FullFineTune")
