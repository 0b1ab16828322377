"""ControlNet (Zhang et al. 2023): a trainable copy of the UNet encoder whose
zero-initialised outputs are added to the frozen UNet's skip connections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difftune.families.base import Family, ModelInputs, Parts
from difftune.methods.base import (
    FromSettings,
    Trained,
    family_usage,
    freeze,
    mean_loss,
    restore_pretrained,
    same_samples,
    store_pretrained,
    trainable_fp32,
)
from difftune.methods.controlnet.spec import ControlNetMethod
from difftune.methods.full.method import generate_conditioned
from difftune.rundir import stands_for


class ControlNet(FromSettings):
    floor_settings = {"controlnet_conditioning_scale": 0.0}
    """Generation settings that switch the method off: the base alone, for the metric floor."""
    card_tags = ["controlnet"]
    config: ControlNetMethod

    def build(self, family: Family, parts: Parts) -> Trained:
        freeze(parts)
        source = self.config.controlnet
        if source is not None and Path(source).is_dir():
            source = str(stands_for(Path(source)))  # a ControlNet run continues from its final/
        controlnet = family.make_controlnet(parts, source, self.config)
        return {"controlnet": trainable_fp32(controlnet)}

    training_data = staticmethod(same_samples)

    def condition(
        self, family: Family, parts: Parts, trained: Trained, batch: dict[str, Any], inputs: ModelInputs
    ) -> ModelInputs:
        conditioning = batch["conditioning_pixels"].to(inputs.noisy.device)
        residuals = family.controlnet_residuals(parts, trained["controlnet"], inputs, conditioning)
        return inputs.with_extra(**residuals)

    reduce = staticmethod(mean_loss)

    store = staticmethod(store_pretrained)
    restore = staticmethod(restore_pretrained)

    def save(self, family: Family, parts: Parts, trained: Trained, out_dir: Path) -> None:
        trained["controlnet"].save_pretrained(out_dir, safe_serialization=True)

    usage = family_usage

    generate = generate_conditioned("controlnet")
