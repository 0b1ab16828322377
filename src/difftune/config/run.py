"""The whole run's config: its sections, and the checks that span several of them
(the family trains the method, caches and validation fit the method)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import model_validator

from difftune.config.outputs import HubConfig, ValidationConfig
from difftune.config.sections import (
    OBJECTIVE_OPTIONS,
    DataConfig,
    MethodConfig,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
    _Section,
)

COMMON_OPTIONS = ("noise_offset",)


class RunConfig(_Section):
    model: ModelConfig
    method: MethodConfig = MethodConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    data: DataConfig
    train: TrainConfig
    validation: ValidationConfig = ValidationConfig()
    hub: HubConfig = HubConfig()

    @model_validator(mode="before")
    @classmethod
    def _family_resolution(cls, raw: Any) -> Any:
        """data.resolution defaults to the family's native size (SDXL: 1024)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict) or "resolution" in raw["data"]:
            return raw
        model = raw.get("model")
        name = model.get("family", "sd") if isinstance(model, dict) else getattr(model, "family", "sd")
        from difftune.catalog import families

        family = families().get(name) if isinstance(name, str) else None
        if family is None:
            return raw  # ModelConfig names the unknown family
        return {**raw, "data": {**raw["data"], "resolution": family.default_resolution}}

    @model_validator(mode="before")
    @classmethod
    def _unknown_family_named_by_base(cls, raw: Any) -> Any:
        """An unknown model.family, said with what the base is (its model_index.json)."""
        model = raw.get("model") if isinstance(raw, dict) else None
        if not isinstance(model, dict) or not isinstance(model.get("family"), str):
            return raw
        from difftune.catalog import families, family_of_pipeline

        name, base = model["family"], model.get("pretrained")
        if name in families() or not isinstance(base, str) or not base.strip():
            return raw
        found = family_of_pipeline(Path(os.path.expanduser(base)), model.get("revision"))
        if found is not None:
            raise ValueError(f"model.family: unknown family {name!r}; difftune has "
                             f"{', '.join(map(repr, sorted(families())))}, and model.pretrained {base!r} is a "
                             f"{found.description} pipeline: set model.family = {found.name!r}")
        return raw

    @model_validator(mode="after")
    def _family_trains_the_method(self) -> RunConfig:
        """What the family trains; a refusal that comes from a base of another family (an
        "sd" left as the default on a CogView4 base) names the base's family instead. (The
        plan checks the base's family in any case, before models load.)"""
        from difftune.catalog import base_family_problem

        try:
            self._family_fits()
        except ValueError:
            problem = base_family_problem("model.pretrained", self.model.pretrained, self.model.family,
                                          "model.family", self.model.revision)
            if problem:
                raise ValueError(problem) from None
            raise
        return self

    def _family_fits(self) -> None:
        from difftune.catalog import families

        family = families()[self.model.family]
        if self.method.kind not in family.supports:
            raise ValueError(f"method.kind = {self.method.kind!r}: family {family.name!r} ({family.description}) "
                             f"trains {', '.join(sorted(family.supports))}")
        if self.data.cache_text is True and not family.caches_text:
            raise ValueError(f"data.cache_text: family {family.name!r} encodes a caption differently in each batch "
                             "(padded to the batch's longest), so its embeddings cannot be cached")
        allowed = family.mixed_precisions
        if allowed is not None and self.train.mixed_precision not in allowed:
            raise ValueError(f"train.mixed_precision = {self.train.mixed_precision!r}: family {family.name!r} trains "
                             f"in {' or '.join(map(repr, allowed))} (it overflows in fp16)")
        if self.method.train_text_encoder and not family.text_encoder_trainable:
            raise ValueError(f"method.train_text_encoder: family {family.name!r} trains its transformer alone "
                             "(diffusers loads no text-encoder weights for it)")
        blocks = {name: getattr(self.method, name) for name in ("controlnet_double_blocks", "controlnet_single_blocks")
                  if getattr(self.method, name) != MethodConfig.model_fields[name].default}
        if blocks and not family.controlnet_blocks:
            raise ValueError(f"method.{next(iter(blocks))}: family {family.name!r} copies its whole encoder into a "
                             "ControlNet; the block counts are for Flux")
        self._check_controlnet_blocks(family, blocks)
        foreign = [name for kind, names in OBJECTIVE_OPTIONS.items() if kind != family.objective_kind
                   for name in names if getattr(self.objective, name) != ObjectiveConfig.model_fields[name].default]
        if foreign:
            raise ValueError(f"objective.{foreign[0]}: family {family.name!r} trains with {family.objective_kind}, "
                             f"which has no such option (its options: "
                             f"{', '.join(OBJECTIVE_OPTIONS[family.objective_kind] + COMMON_OPTIONS)})")

    def _check_controlnet_blocks(self, family: Any, blocks: dict[str, int]) -> None:
        """A new Flux ControlNet copies some blocks (none at all would steer nothing); a
        ControlNet continued from method.controlnet keeps its own."""
        method = self.method
        if method.kind != "controlnet" or not family.controlnet_blocks:
            return
        if method.controlnet is not None and blocks:
            raise ValueError(f"method.{next(iter(blocks))}: method.controlnet continues an existing ControlNet, "
                             "which keeps its own blocks; leave the block counts unset")
        if method.controlnet is None and method.controlnet_double_blocks + method.controlnet_single_blocks == 0:
            raise ValueError("method.controlnet_double_blocks and controlnet_single_blocks are both 0: a ControlNet "
                             "of no blocks adds nothing to the transformer; copy at least one")

    @model_validator(mode="after")
    def _caches_fit_the_method(self) -> RunConfig:
        validation, method = self.validation, self.method
        if validation.images and not method.needs_conditioning:
            raise ValueError(
                f"validation.images: method {method.kind!r} takes no conditioning image (they would be "
                "ignored); give validation.prompts alone")
        if validation.prompts and not validation.images and method.needs_conditioning:
            raise ValueError(f"validation.images: method {method.kind!r} needs a conditioning image per prompt")
        if validation.metric != "none" and not method.needs_conditioning:
            raise ValueError(f"validation.metric: {validation.metric!r} scores how well images follow their "
                             f"conditioning, and method {method.kind!r} takes none")
        if self.model.quantize and not (self.method.kind in ("lora", "controlnet") or self.method.uses_lora):
            raise ValueError(f"model.quantize = {self.model.quantize!r}: method {self.method.kind!r} without "
                             "[method.lora] trains every weight of the denoiser, which cannot be held in "
                             f"{self.model.quantize}; quantize a frozen base: lora, controlnet, or control / "
                             "dreambooth with [method.lora]")
        if self.data.cache_text is True and self.method.train_text_encoder:
            raise ValueError("data.cache_text cannot be used with method.train_text_encoder (the embeddings change)")
        if self.data.streaming and self.method.kind == "dreambooth":
            raise ValueError("data.streaming: DreamBooth pairs each instance image with a class image; its few "
                             "instance images are read whole (leave streaming off)")
        if self.objective.prediction_type is not None and (self.method.kind in ("controlnet", "lora") or self.method.uses_lora):
            raise ValueError(
                "objective.prediction_type is saved only with a whole pipeline (full, DreamBooth without "
                "LoRA); a ControlNet or LoRA trained for another type would sample wrongly on its base"
            )
        return self
