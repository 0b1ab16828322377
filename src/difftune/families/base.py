"""The seam between the training loop and a model family.

Light on purpose: the config checks which families exist and what each supports before
torch is imported, so a family module imports torch, diffusers and transformers inside
its functions, never at the top.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from difftune.paths import PathError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from difftune.config import ModelConfig, ObjectiveConfig
    from difftune.method_settings import MethodSettings
    from difftune.objectives import Objective

GEOMETRY_FIELDS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
"""Per-sample geometry, in this order (SDXL's time ids are exactly these six numbers)."""


@dataclass(frozen=True)
class ModelInputs:
    """What the denoiser sees in one step; methods add to it through `extra`."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    text: dict[str, torch.Tensor]
    """The family's prompt conditioning, by name (SD: hidden_states; SDXL adds pooled)."""
    geometry: torch.Tensor | None = None
    """(batch, 6) sizes and crops, GEOMETRY_FIELDS; None: every sample at its target size."""
    extra: dict[str, Any] = field(default_factory=dict)

    def with_extra(self, **values: Any) -> ModelInputs:
        return replace(self, extra={**self.extra, **values})


@dataclass
class Parts:
    """The loaded components of a base pipeline, by their names in the family's
    diffusers pipeline ("unet", "vae", "text_encoder_2", ...): frozen unless a method
    says otherwise. A trained module replaces the part of its name (`with_modules`)."""

    source: str
    components: dict[str, Any]
    denoiser_name: str = "unet"
    text_encoder_names: tuple[str, ...] = ("text_encoder",)
    settings: dict[str, Any] = field(default_factory=dict)
    """The base pipeline's options that are not components (model_index.json), such as
    SDXL's force_zeros_for_empty_prompt: training follows them and pipelines keep them."""
    constants: dict[str, Any] = field(default_factory=dict)
    """Fixed inputs of the denoiser that the config sets (Flux: the guidance value)."""
    trainable_text_encoder_names: tuple[str, ...] | None = None
    """The text encoders a method may train or adapt (None: all; Flux: CLIP, not T5,
    as diffusers' Flux LoRA loader reads)."""
    weight_options: dict[str, Any] = field(default_factory=dict)
    """How the base's weights were read (revision, variant), to read a part again in full
    precision (a Control-LoRA's fused copy, when the loaded part was quantized)."""
    sampler: Any = None
    """The scheduler the pipelines sample with in place of the family's sampler
    (validation.scheduler: a step-distilled base's own, or the one the config names), made
    from the base's scheduler config; each pipeline gets a fresh copy (schedulers keep state)."""

    @property
    def trainable_text_encoders(self) -> tuple[str, ...]:
        names = self.trainable_text_encoder_names
        return self.text_encoder_names if names is None else names

    @property
    def denoiser(self) -> Any:
        return self.components[self.denoiser_name]

    @property
    def vae(self) -> Any:
        return self.components["vae"]

    @property
    def noise_scheduler(self) -> Any:
        return self.components["scheduler"]

    @property
    def text_encoders(self) -> list[Any]:
        return [self.components[name] for name in self.text_encoder_names]

    def modules(self) -> dict[str, nn.Module]:
        """The weighted parts of the base (not a trained addition such as a ControlNet)."""
        return {name: self.components[name] for name in (*self.text_encoder_names, "vae", self.denoiser_name)}

    def with_modules(self, modules: dict[str, Any]) -> Parts:
        """These parts with `modules` in place of (or beside) the parts of their names."""
        return replace(self, components={**self.components, **modules})


def check_weights_loaded(modules: dict[str, nn.Module], source: str) -> None:
    """Every parameter got a value from its file. diffusers leaves a parameter the weight
    file lacks on the "meta" device (no data), and the first use fails deep inside torch;
    a weight file that does not match its config.json is named here instead."""
    for name, module in modules.items():
        missing = [key for key, parameter in module.named_parameters() if parameter.is_meta]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise PathError(f"{source}: {name} has no weights for {len(missing)} parameter(s) ({shown}): its weight "
                            "file does not match its config.json")


def inference_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A trained model in the frozen parts' dtype, for generation.

    A copy when anything differs: the fp32 master weights are never rounded, and the copy
    drops accelerate's mixed-precision forward wrapper (an instance attribute that makes
    outputs fp32, which a half-precision pipeline cannot take). Works alike for diffusers,
    transformers and peft-adapted modules.
    """
    patched = "forward" in vars(model)
    if not patched and all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return model
    fresh = copy.deepcopy(model)
    vars(fresh).pop("forward", None)
    vars(fresh).pop("_original_forward", None)
    return fresh.to(dtype=dtype).eval()


def dtype_of(module: nn.Module) -> torch.dtype:
    """A module's dtype, also through a wrapper (DDP) that has no .dtype: its first
    floating-point parameter's (a quantized weight is stored as integers)."""
    parameters = list(module.parameters())
    return next((p.dtype for p in parameters if p.is_floating_point()), parameters[0].dtype)


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class FamilyCore(Protocol):
    """What every family is: its facts (families/<name>/facts.py, also its attributes), how
    to load its parts, encode prompts and images, run its denoiser with its objective, and
    the pipelines that run the result. families.latent.LatentFamily implements most of it
    from class names; a family writes its prompt encoding, its denoiser call and its
    objective."""

    name: str
    description: str
    """What the family covers, for messages and the config's docs."""
    capabilities: frozenset[str]
    """What it offers beyond this core: the protocols below it implements."""
    supports: frozenset[str]
    """The method kinds it can train (derived from its capabilities)."""
    components: dict[str, str]
    """Subfolder of the pipeline -> its kind ("model", "tokenizer", "scheduler"), checked
    before anything loads."""
    denoiser_name: str
    objective_kind: str
    """"ddpm" or "flow_matching": which [objective] options apply, checked at config load."""
    text_encoder_names: tuple[str, ...]
    tokenizer_names: tuple[str, ...]
    trainable_text_encoder_names: tuple[str, ...] | None
    """The text encoders train_text_encoder trains (None: every one)."""
    caches_text: bool
    """Whether a caption's embedding is the same in every batch (so it can be cached)."""
    default_resolution: int
    license: str
    card_tags: list[str]
    pipeline_classes: dict[str, str]
    """diffusers pipeline class names by what they run: "text_to_image", "controlnet", "control"."""
    gpu_dtype: str
    latent_patch: int
    """Latent pixels per side of one denoiser token (Flux: 2); sizes are multiples of VAE factor x this."""
    pipeline_multiple: int
    """What the family's pipelines demand of a size besides (CogView4Pipeline: 16)."""
    negative_prompt: bool
    """Whether its pipelines use a negative prompt as `difftune generate` runs them."""

    # --- its limits, from the base's configs before any weight loads (families/limits.py)
    def latent_patch_of(self, base: str, revision: str | None = None) -> tuple[int, str]:
        """(latent_patch as the base's configs say, where that comes from), before any weight loads."""
        ...

    def method_problems(self, method: MethodSettings, base: str, revision: str | None = None) -> list[str]:
        """What the base's configs rule out in the [method] section, before any weight loads."""
        ...

    def folder_problems(self, folder: Path) -> list[str]:
        """What a local pipeline folder lacks for this family beyond its files (from the
        configs alone, before anything loads)."""
        ...

    # --- load, encode, predict
    def load(self, config: ModelConfig, denoiser_in_memory: bool = False) -> Parts:
        """The frozen parts. denoiser_in_memory: read the denoiser's weights into memory
        instead of mapping the file (see setup.denoiser_in_memory)."""
        ...

    def objective(self, parts: Parts, config: ObjectiveConfig) -> Objective:
        """What the denoiser learns to predict, and how the loss is weighted."""
        ...

    def encode_prompts(self, parts: Parts, captions: list[str]) -> dict[str, torch.Tensor]:
        """The prompt conditioning by name; one row per caption in every tensor."""
        ...

    def text_cache_identity(self, parts: Parts) -> dict[str, Any]:
        """Everything besides the encoders' weights that changes a prompt's conditioning."""
        ...

    def cached_prompt(self, encoded: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
        """Row `row` of encode_prompts' (or encode_edit_prompts') output as the text cache
        keeps it (a family that pads each batch to its longest prompt: unpadded)."""
        ...

    def latent_distribution(self, parts: Parts, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image encoder's posterior (mean, std), before any scaling."""
        ...

    def sample_latents(
        self, parts: Parts, mean: torch.Tensor, std: torch.Tensor, generators: list[torch.Generator] | None
    ) -> torch.Tensor:
        """Scaled latents drawn from a posterior, one generator per sample (None: the mean)."""
        ...

    def encode_images(
        self, parts: Parts, pixels: torch.Tensor, generators: list[torch.Generator] | None
    ) -> torch.Tensor: ...

    def vae_scale_factor(self, parts: Parts) -> int: ...

    def predict(self, parts: Parts, inputs: ModelInputs) -> torch.Tensor: ...

    # --- pipelines
    def sampler(self, scheduler: Any) -> Any:
        """The scheduler pipelines sample with, made from a base's scheduler."""
        ...

    def pipeline(self, parts: Parts, kind: str | None = None) -> Any:
        """An inference pipeline over the loaded parts (nothing re-read from disk) of `kind`
        ("text_to_image", "controlnet", "control"); by default, with a "controlnet"
        component, the ControlNet pipeline, else text-to-image."""
        ...

    def pipeline_class(self, kind: str) -> Any: ...

    def generation_options(self, pipeline: Any) -> dict[str, Any]:
        """Call arguments every generation with the family's pipelines takes, so it sees
        the prompt as training encoded it (Flux: max_sequence_length)."""
        ...

    def guidance_arguments(self, pipeline: Any, scale: float, prompt_count: int) -> dict[str, Any]:
        """The call arguments that guide `prompt_count` prompts through `pipeline` at guidance
        `scale` (most pipelines: guidance_scale, classifier-free or, for a guidance-distilled
        transformer, its guidance input; Qwen-Image's: true_cfg_scale with a negative prompt,
        without which they do not guide)."""
        ...

    def load_pipeline(self, base: str, dtype: Any, controlnet: Any = None, kind: str | None = None,
                      **parts: Any) -> Any:
        """The pipeline of a saved base (with a loaded ControlNet, of `kind`, with parts
        in place of its own), for `difftune generate`."""
        ...


class ControlNetCapability(Protocol):
    """capability "controlnet": a ControlNet beside the frozen denoiser."""

    controlnet_class: str
    """The diffusers class of its ControlNets."""

    def make_controlnet(self, parts: Parts, source: str | None, settings: MethodSettings | None = None) -> nn.Module:
        """A new ControlNet from the denoiser (its size from `settings` where the family
        has a choice), or the one at `source` to continue."""
        ...

    def controlnet_residuals(
        self, parts: Parts, controlnet: nn.Module, inputs: ModelInputs, conditioning: torch.Tensor
    ) -> dict[str, Any]:
        """What the ControlNet adds to the denoiser's inputs (`ModelInputs.extra`), from
        conditioning pixels in [0, 1]."""
        ...

    def control_arguments(self, image: Any) -> dict[str, Any]:
        """The pipeline call's keyword for a conditioning image (`image=`, `control_image=`)."""
        ...

    def load_controlnet(self, path: str, dtype: Any) -> Any: ...


class ControlCapability(Protocol):
    """capability "control": channel-concat Control, the control image's latents beside
    the noisy ones at the denoiser's input."""

    input_projection: str
    """The denoiser's input layer (a module path) that channel-concat Control widens."""

    def widened_config(self, config: Any) -> dict[str, Any]:
        """The denoiser config entries after `input_projection` takes the control latents too."""
        ...


class LoraCapability(Protocol):
    """capability "lora": peft adapters on the denoiser (and text encoders), the file its
    pipelines' load_lora_weights reads, and the kohya/ComfyUI key names."""

    lora_targets: tuple[str, ...]
    """Denoiser module names a LoRA adapts by default."""
    attention_options: str
    """The pipeline call's argument that carries a LoRA scale ("cross_attention_kwargs")."""
    kohya_prefixes: dict[str, str]
    """LoRA key prefix of each adapted part in the kohya/ComfyUI format ({}: not written)."""
    kohya_unet_names: str
    """"diffusers" or "original": how the kohya format names the denoiser's modules."""

    def save_lora(self, out_dir: Path, adapted: dict[str, nn.Module]) -> None:
        """Adapter weights of the adapted parts (by part name) in the file the family's
        pipeline `load_lora_weights` reads."""
        ...

    def original_unet_names(self, config: dict) -> Any:
        """With kohya_unet_names "original": a function from the denoiser's diffusers module
        paths to the original layout's, given its config."""
        ...


class EditCapability(Protocol):
    """capability "edit": reference images beside the instruction (FLUX.1 Kontext,
    Qwen-Image-Edit). Their latents are appended to the denoiser's token sequence with
    position ids of their own, as the family's edit pipeline does at inference, and the
    prediction is the target's tokens only. `predict` reads them from
    `ModelInputs.extra["references"]` (families/edit.py: a list over samples of each
    sample's reference latents; `predict_by_references` runs the samples that share a
    reference count and sizes together)."""

    def reference_size(self, reference: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
        """(width, height) a reference of size `reference` is encoded at beside a target of
        size `target`, as the family's edit pipeline sizes it."""
        ...

    def encode_edit_prompts(
        self, parts: Parts, captions: list[str], references: list[list[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The instructions' conditioning, each with its sample's references (pixels in
        [0, 1], (3, h, w)): `encode_prompts` unless the family's text encoder sees the image."""
        ...

    def max_references(self, base: str, revision: str | None = None) -> int | None:
        """How many references one prompt takes (None: any), as the base's edit pipeline
        reads them (FluxKontextPipeline: 1), from its configs before any weight loads."""
        ...

    prompt_sees_references: bool
    """Whether the instruction's conditioning depends on the reference images (Qwen-Image-Edit's
    vision-language encoder): then the text cache keeps one per row and caption."""

    def edit_arguments(self, image: Any, width: int | None, height: int | None) -> dict[str, Any]:
        """The edit pipeline call's keywords for its `image` (one PIL reference, or a list
        with one per prompt) and the target's size."""
        ...


class SingleFileCapability(Protocol):
    """A single-file checkpoint in the family's original layout (families/<name>/single_file.py)."""

    def export_single_file(self, pipeline_dir: Path, out_file: Path, half: bool) -> Path:
        """The pipeline folder as one checkpoint in the family's original layout."""
        ...


class Family(FamilyCore, ControlNetCapability, ControlCapability, LoraCapability, EditCapability,
             SingleFileCapability, Protocol):
    """A family as the loop, the methods and the verbs see it: the core, and the
    capabilities its facts list (a method needing one runs only on families that list it;
    catalog.FamilyFacts.supports)."""
