"""What a run leaves in final/, one Result per kind of output. A method's settings say
which kind it makes (MethodSettings.result); the Result recognises such a folder, names
the `difftune generate` flag that takes it, attaches it to a pipeline built from the
base, and writes the Python that loads it with diffusers (the model card's usage).
`difftune generate` loads every result through `attach`, and the model card's snippet
comes from `usage`, so what the card says is what generate does.

Light: nothing heavy is imported until a result is attached.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EMBEDDINGS_FILE = "learned_embeds.safetensors"


@dataclass(frozen=True)
class Result:
    """One kind of output. `marker` is the file (relative to final/) that makes a folder
    this kind; `made` says what it is in a sentence; `flag` is generate's flag for it."""

    kind: str
    made: str
    flag: str
    marker: str

    def recognise(self, folder: Path) -> bool:
        return (folder / self.marker).is_file()

    def usage(self, family: Any, repo: str, base: str) -> str:
        pipeline = family.pipeline_classes["text_to_image"]
        return f'from diffusers import {pipeline}\npipe = {pipeline}.from_pretrained("{repo}")'

    def attach(self, family: Any, pipe: Any, folder: Path) -> None:
        """Load the result onto a pipeline built from its base (a result that is a whole
        pipeline, or a part the pipeline is built with, attaches nothing)."""


@dataclass(frozen=True)
class LoraResult(Result):
    """diffusers' LoRA file (LoRA and DoRA): `pipe.load_lora_weights`."""

    def usage(self, family: Any, repo: str, base: str) -> str:
        pipeline = family.pipeline_classes["text_to_image"]
        return (f"from diffusers import {pipeline}\n"
                f'pipe = {pipeline}.from_pretrained("{base}")\n'
                f'pipe.load_lora_weights("{repo}")')

    def attach(self, family: Any, pipe: Any, folder: Path) -> None:
        pipe.load_lora_weights(str(folder))


@dataclass(frozen=True)
class ControlNetResult(Result):
    """A ControlNet folder, which the family's ControlNet pipeline is built with."""

    def recognise(self, folder: Path) -> bool:
        return (folder / "config.json").is_file() and not (folder / "model_index.json").is_file()

    def usage(self, family: Any, repo: str, base: str) -> str:
        pipeline, net = family.pipeline_classes["controlnet"], family.controlnet_class
        return (f"from diffusers import {net}, {pipeline}\n"
                f'controlnet = {net}.from_pretrained("{repo}")\n'
                f'pipe = {pipeline}.from_pretrained("{base}", controlnet=controlnet)')


@dataclass(frozen=True)
class ControlResult(Result):
    """A whole channel-concat Control pipeline (FluxControlPipeline, CogView4ControlPipeline)."""

    def usage(self, family: Any, repo: str, base: str) -> str:
        control = family.pipeline_classes["control"]
        return f'from diffusers import {control}\npipe = {control}.from_pretrained("{repo}")'


@dataclass(frozen=True)
class ControlLoraResult(Result):
    """A Control-LoRA: a LoRA file for the base's control pipeline, or, where that
    pipeline reads no LoRA (CogView4), the transformer the run fused it into."""

    def recognise(self, folder: Path) -> bool:
        return (folder / LORA_FILE).is_file() or (folder / "transformer" / "config.json").is_file()

    def usage(self, family: Any, repo: str, base: str) -> str:
        control = family.pipeline_classes["control"]
        if not hasattr(family.pipeline_class("control"), "load_lora_weights"):  # the fused transformer
            return (f"from diffusers import {control}, {family.denoiser_class}\n"
                    f'{family.denoiser_name} = {family.denoiser_class}.from_pretrained("{repo}", '
                    f'subfolder="{family.denoiser_name}")\n'
                    f'pipe = {control}.from_pretrained("{base}", {family.denoiser_name}={family.denoiser_name})')
        return (f"from diffusers import {control}\n"
                f'pipe = {control}.from_pretrained("{base}")\n'
                f'pipe.load_lora_weights("{repo}")')

    def attach(self, family: Any, pipe: Any, folder: Path) -> None:
        if (folder / LORA_FILE).is_file():
            pipe.load_lora_weights(str(folder))


@dataclass(frozen=True)
class EditResult(Result):
    """A whole edit pipeline (FluxKontextPipeline, QwenImageEditPipeline)."""

    def usage(self, family: Any, repo: str, base: str) -> str:
        edit = family.pipeline_classes["edit"]
        return f'from diffusers import {edit}\npipe = {edit}.from_pretrained("{repo}")'


@dataclass(frozen=True)
class EditLoraResult(LoraResult):
    """An edit LoRA: the LoRA file the base's edit pipeline's load_lora_weights reads."""

    def usage(self, family: Any, repo: str, base: str) -> str:
        edit = family.pipeline_classes["edit"]
        return (f"from diffusers import {edit}\n"
                f'pipe = {edit}.from_pretrained("{base}")\n'
                f'pipe.load_lora_weights("{repo}")')


@dataclass(frozen=True)
class AdapterResult(Result):
    """peft adapters diffusers' LoRA loader does not read (LoKr, LoHa): one folder per
    adapted part, `<part>/adapter_config.json` and `<part>/adapter_model.safetensors`
    (peft's own names), added to the pipeline's part with peft."""

    def recognise(self, folder: Path) -> bool:
        return bool(adapter_parts(folder))

    def usage(self, family: Any, repo: str, base: str) -> str:
        pipeline = family.pipeline_classes["text_to_image"]
        return (f"import json\n"
                f"from diffusers import {pipeline}\n"
                f"from huggingface_hub import snapshot_download\n"
                f"from peft import PeftConfig, set_peft_model_state_dict\n"
                f"from safetensors.torch import load_file\n"
                f'pipe = {pipeline}.from_pretrained("{base}")\n'
                f'folder = snapshot_download("{repo}")\n'
                f"for part in {sorted(family.components)!r}:\n"
                f"    try:\n"
                f'        config = json.load(open(f"{{folder}}/{{part}}/{ADAPTER_CONFIG}"))\n'
                f"    except FileNotFoundError:\n"
                f"        continue\n"
                f"    getattr(pipe, part).add_adapter(PeftConfig.from_peft_type(**config))\n"
                f'    set_peft_model_state_dict(getattr(pipe, part), load_file(f"{{folder}}/{{part}}/{ADAPTER_WEIGHTS}"))')

    def attach(self, family: Any, pipe: Any, folder: Path) -> None:
        from peft import PeftConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        for part in adapter_parts(folder):
            module = getattr(pipe, part, None)
            if module is None:
                raise ValueError(f"{folder / part}: the pipeline has no part {part!r}")
            config = read_adapter_config(folder / part / ADAPTER_CONFIG)
            module.add_adapter(PeftConfig.from_peft_type(**config))
            outcome = set_peft_model_state_dict(module, load_file(folder / part / ADAPTER_WEIGHTS))
            unexpected = getattr(outcome, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"{folder / part / ADAPTER_WEIGHTS}: keys {part} lacks: {unexpected[:5]}")


@dataclass(frozen=True)
class EmbeddingResult(Result):
    """Textual inversion: the new token's vectors in diffusers' learned_embeds format,
    which `pipe.load_textual_inversion` reads (one file per text encoder for SDXL)."""

    def usage(self, family: Any, repo: str, base: str) -> str:
        pipeline = family.pipeline_classes["text_to_image"]
        return (f"from diffusers import {pipeline}\n"
                f'pipe = {pipeline}.from_pretrained("{base}")\n'
                + "".join(f'pipe.load_textual_inversion("{repo}", weight_name="{weights}", '
                          f"text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})\n"
                          for encoder, tokenizer, weights in embedding_files(family)))

    def attach(self, family: Any, pipe: Any, folder: Path) -> None:
        for encoder, tokenizer, weights in embedding_files(family):
            pipe.load_textual_inversion(str(folder), weight_name=weights, text_encoder=getattr(pipe, encoder),
                                        tokenizer=getattr(pipe, tokenizer))


def embedding_files(family: Any) -> list[tuple[str, str, str]]:
    """(text encoder, its tokenizer, the file of its vectors) for each text encoder:
    learned_embeds.safetensors for the first, learned_embeds_2.safetensors for the second
    (as diffusers' SDXL textual-inversion script writes them)."""
    pairs = zip(family.text_encoder_names, family.tokenizer_names, strict=True)
    return [(encoder, tokenizer, EMBEDDINGS_FILE if n == 1 else f"learned_embeds_{n}.safetensors")
            for n, (encoder, tokenizer) in enumerate(pairs, start=1)]


def adapter_parts(folder: Path) -> list[str]:
    """The parts a folder holds peft adapters for (`<part>/adapter_config.json`)."""
    if not folder.is_dir():
        return []
    return sorted(child.name for child in folder.iterdir()
                  if child.is_dir() and (child / ADAPTER_CONFIG).is_file() and (child / ADAPTER_WEIGHTS).is_file())


def read_adapter_config(path: Path) -> dict[str, Any]:
    """An adapter's peft config, read as data (a crafted file names itself): an object
    whose peft_type is one difftune writes."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: not a readable adapter config ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type") not in ("LOKR", "LOHA", "LORA"):
        raise ValueError(f"{path}: not a peft LoKr, LoHa or LoRA config (peft_type "
                         f"{config.get('peft_type') if isinstance(config, dict) else None!r})")
    return config


RESULTS: dict[str, Result] = {result.kind: result for result in (
    Result("pipeline", "a whole pipeline", "--base", "model_index.json"),
    LoraResult("lora", "a LoRA", "--lora", LORA_FILE),
    ControlNetResult("controlnet", "a ControlNet", "--controlnet", "config.json"),
    ControlResult("control", "a Control pipeline", "--base", "model_index.json"),
    ControlLoraResult("control_lora", "a Control-LoRA", "--lora", LORA_FILE),
    AdapterResult("adapter", "peft adapters (LoKr or LoHa)", "--lora", ADAPTER_CONFIG),
    EmbeddingResult("embedding", "a textual-inversion embedding", "--embedding", EMBEDDINGS_FILE),
    EditResult("edit", "an edit pipeline", "--base", "model_index.json"),
    EditLoraResult("edit_lora", "an edit LoRA", "--lora", LORA_FILE),
)}
"""Every kind of result, by the name MethodSettings.result gives."""


def result_of(kind: str) -> Result:
    return RESULTS[kind]


def run_result(config: dict[str, Any] | None) -> str | None:
    """The kind of result a run's recorded config makes (its [method] settings' `result`);
    None when there is no config or its [method] table is not one this version reads."""
    from difftune.catalog import default_method, methods

    table = (config or {}).get("method")
    if not isinstance(table, dict):
        return None
    spec = methods().get(table.get("kind", default_method()))
    try:
        return spec.settings.model_validate(table).result if spec is not None else None
    except ValueError:
        return None


def recognise(folder: Path, kind: str | None = None) -> Result | None:
    """The result a final/ folder holds: of the `kind` its run recorded when known, else
    the first whose files it has (a whole pipeline before a ControlNet's config.json)."""
    if kind is not None and kind in RESULTS:
        return RESULTS[kind] if RESULTS[kind].recognise(folder) else None
    for name in ("pipeline", "lora", "adapter", "embedding", "controlnet"):
        if RESULTS[name].recognise(folder):
            return RESULTS[name]
    return None
