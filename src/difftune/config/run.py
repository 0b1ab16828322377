"""The whole run's config: its sections, and the checks that span several of them
(the family trains the method, caches and validation fit the method)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, model_validator

from difftune.config.outputs import HubConfig, ValidationConfig
from difftune.catalog import default_method, methods
from difftune.config.sections import (
    OBJECTIVE_OPTIONS,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
    _Section,
)

COMMON_OPTIONS = ("noise_offset",)


def _kind_of(raw: Any) -> Any:
    """The tag that picks a [method] table's settings class: its kind (the default kind
    when the table says none)."""
    if isinstance(raw, dict):
        return raw.get("kind", default_method())
    return getattr(raw, "kind", None)


MethodTable = Annotated[
    Union[tuple(Annotated[spec.settings, Tag(kind)] for kind, spec in methods().items())],  # noqa: UP007
    Discriminator(_kind_of, custom_error_type="unknown_method",
                  custom_error_message="unknown method kind"),
]
"""[method]: the settings class of its `kind` (each method's spec.py), so each kind takes
only its own keys."""


class RunConfig(_Section):
    model: ModelConfig
    method: MethodTable = methods()[default_method()].settings()
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
    def _sampling_from_the_base(self) -> RunConfig:
        """validation.steps, guidance_scale and scheduler left unset: the method's result's
        where the method decides how it samples (method.sampling: an LCM-LoRA's), else the
        base's own where it is step-distilled (its scheduler config says so: sampling.py),
        else 20, 7.5 and the family's sampler; written here, so the run's config.toml records
        what it used."""
        validation = self.validation
        if validation.steps is not None and validation.guidance_scale is not None and validation.scheduler:
            return self
        from difftune.sampling import read_base_sampling

        base = self.method.sampling or read_base_sampling(self.model.pretrained, self.model.revision)
        if validation.steps is None:
            validation.steps = base.steps
        if validation.guidance_scale is None:
            validation.guidance_scale = base.guidance_scale
        if validation.scheduler is None and base.scheduler is not None:
            validation.scheduler = base.scheduler
        return self

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
        problem = self.method.family_problem(family)
        if problem is not None:
            raise ValueError(problem)
        changed = [name for name, field in ObjectiveConfig.model_fields.items()
                   if getattr(self.objective, name) != field.default]
        if changed and self.method.own_loss:
            raise ValueError(f"objective.{changed[0]}: method {self.method.kind!r} trains with "
                             f"{self.method.own_loss}; it reads no [objective] option (remove the table)")
        own_options = OBJECTIVE_OPTIONS[family.objective_kind] + COMMON_OPTIONS
        foreign = [name for name in changed if name not in own_options]
        if foreign:
            raise ValueError(f"objective.{foreign[0]}: family {family.name!r} trains with {family.objective_kind}, "
                             f"which has no such option (its options: "
                             f"{', '.join(own_options)})")

    @model_validator(mode="after")
    def _caches_fit_the_method(self) -> RunConfig:
        validation, method = self.validation, self.method
        if validation.images and not method.needs_conditioning:
            raise ValueError(
                f"validation.images: method {method.kind!r} takes no conditioning image (they would be "
                "ignored); give validation.prompts alone")
        several = [index for index, entry in enumerate(validation.images) if isinstance(entry, list)]
        if several and not method.takes_references:
            raise ValueError(f"validation.images[{several[0]}]: a list of images is an edit's several references; "
                             f"method {method.kind!r} takes one conditioning image per prompt")
        if validation.prompts and not validation.images and method.needs_conditioning:
            raise ValueError(f"validation.images: method {method.kind!r} needs a conditioning image per prompt")
        if validation.metric != "none" and not method.needs_conditioning:
            raise ValueError(f"validation.metric: {validation.metric!r} scores how well images follow their "
                             f"conditioning, and method {method.kind!r} takes none")
        if self.model.quantize and self.method.trains_every_weight:
            lora = " without [method.lora]" if "lora" in type(self.method).model_fields else ""
            raise ValueError(f"model.quantize = {self.model.quantize!r}: method {self.method.kind!r}{lora} trains "
                             f"every weight of the denoiser, which cannot be held in {self.model.quantize}; quantize "
                             "a frozen base: train adapters ([method.lora]) or a ControlNet")
        if self.model.quantize and self.method.uses_lora:
            problem = self.method.lora.quantize_problem(self.model.quantize)
            if problem:
                raise ValueError(problem)
        if self.data.cache_text is True and self.method.trains_text_encoder:
            raise ValueError(f"data.cache_text: method {self.method.kind!r} trains the text encoders "
                             "(method.train_text_encoder, or its own kind), so the embeddings change")
        if self.data.streaming and self.method.streaming_refused:
            raise ValueError(f"data.streaming: method {self.method.kind!r} {self.method.streaming_refused}; "
                             "leave streaming off")
        if self.objective.prediction_type is not None and self.method.result not in ("pipeline", "control"):
            raise ValueError(
                "objective.prediction_type is saved only with a whole pipeline (full, DreamBooth without "
                "LoRA); a ControlNet or LoRA trained for another type would sample wrongly on its base"
            )
        return self
