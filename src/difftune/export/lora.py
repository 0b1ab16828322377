"""LoRA files in other key formats.

A LoRA run's final/ holds diffusers' `pytorch_lora_weights.safetensors`. The kohya
format (sd-scripts, AUTOMATIC1111, ComfyUI, InvokeAI) names each adapted module by its
path with dots turned to underscores, with `lora_down`/`lora_up` weights and an `alpha`
scalar per module (and a DoRA's magnitude as `dora_scale`, as LyCORIS writes it). diffusers' own `convert_state_dict_to_kohya` writes alpha = rank and
`lora_te1_` (the SDXL name) for the text encoder, which loses a trained alpha and the
SD1.x/2.x text-encoder name, hence this small converter. The prefixes are the family's
(SD: `lora_unet_`, `lora_te_`; SDXL: `lora_unet_`, `lora_te1_`, `lora_te2_`).

A LoKr or LoHa run's final/ holds peft's adapters instead, one folder per part
(`<part>/adapter_config.json`, `<part>/adapter_model.safetensors`): their kohya export
is one LyCORIS file (export/lycoris.py) with the same module names, which ComfyUI,
A1111 and LyCORIS read. diffusers reads no LoKr/LoHa file, so there is no diffusers
format of them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from difftune import paths
from difftune.weights import WeightsError, read_json_object, read_metadata, read_tensors
from difftune.files import apply_umask

LORA_FILE = paths.LORA_FILE

# "<component>.<module path>.<which matrix>.weight", in the layouts diffusers writes
# (lora.down / lora_linear_layer.down) or reads (peft's lora_A / lora_B).
_KEY = re.compile(
    r"^(?P<component>unet|text_encoder_2|text_encoder)\.(?P<module>.+)\."
    r"(?P<matrix>(lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)\.weight"
    r"|lora_magnitude_vector)$"
)
_DOWN = {"lora.down", "lora_linear_layer.down", "lora_A"}
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def lora_file(run_or_file: str | Path) -> Path:
    """The LoRA file of a run directory, of its final/ folder, or the file itself."""
    return paths.lora_file("source", str(run_or_file))


def adapter_alphas(path: Path) -> dict[str, dict]:
    """Per component: the LoRA alpha and any per-module alpha pattern, from the file's
    adapter metadata (written by difftune and diffusers' save_lora_weights)."""
    key = "lora_adapter_metadata"
    config = read_json_object(path, read_metadata(path).get(key, "{}"), key)
    return {component: _component_alphas(config, component, f"{path}'s {key} {component}")
            for component in _COMPONENTS if f"{component}.lora_alpha" in config}


def _component_alphas(config: dict[str, Any], component: str, where: str) -> dict[str, Any]:
    """One component's alpha and alpha pattern, each a number (a crafted or damaged
    metadata names its key, rather than failing inside float())."""
    pattern = config.get(f"{component}.alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise WeightsError(f"{where}.alpha_pattern is not an object of module names and alphas")
    return {"alpha": _number(config[f"{component}.lora_alpha"], f"{where}.lora_alpha"),
            "pattern": {name: _number(value, f"{where}.alpha_pattern {name}") for name, value in pattern.items()}}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightsError(f"{what} is {json.dumps(value)[:40]}, not a number")
    return float(value)


def kohya_module_name(component: str, module: str, prefixes: dict[str, str],
                      unet_names: Callable[[str], str] | None = None) -> str:
    """`lora_unet_down_blocks_0_..._to_q` (SDXL: `lora_unet_input_blocks_4_1_..._to_q`),
    `lora_te_text_model_encoder_layers_0_..._q_proj`."""
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        module = "text_model." + module  # transformers 5 dropped the text_model level
    if component == "unet" and unet_names is not None:
        module = unet_names(module)
    return prefixes[component] + module.replace(".", "_")


def to_kohya(state: dict[str, torch.Tensor], alphas: dict[str, dict], prefixes: dict[str, str],
             unet_names: Callable[[str], str] | None = None) -> dict[str, torch.Tensor]:
    """Every key converted with the family's `prefixes`, or an error naming the ones that cannot be."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            unknown.append(key)
            continue
        component, module = match["component"], match["module"]
        if component not in prefixes:
            unknown.append(key)
            continue
        name = kohya_module_name(component, module, prefixes, unet_names)
        if match["matrix"] == "lora_magnitude_vector":
            converted[f"{name}.dora_scale"] = dora_scale(tensor)
            continue
        is_down = match["matrix"].removesuffix(".weight") in _DOWN
        converted[f"{name}.{'lora_down' if is_down else 'lora_up'}.weight"] = tensor.contiguous()
        if is_down:
            converted[f"{name}.alpha"] = torch.tensor(_alpha(alphas.get(component), module, tensor))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise ValueError(f"{len(unknown)} key(s) are not LoRA weights of the parts this family adapts "
                         f"({', '.join(prefixes)}): {shown}")
    return converted


def dora_scale(magnitude: torch.Tensor) -> torch.Tensor:
    """peft's DoRA magnitude ((out,) for a linear, (1, out, 1, 1) for a conv) as the
    `dora_scale` LyCORIS writes by default and ComfyUI reads: one value per output row,
    (out, 1) or (out, 1, 1, 1). Both scale the same thing, W + delta normalised per output
    row, so the conversion is exact."""
    out = magnitude.reshape(-1, 1)
    return (out if magnitude.ndim == 1 else out[:, :, None, None]).contiguous()


def _alpha(found: dict | None, module: str, down: torch.Tensor) -> float:
    """The module's alpha: its pattern entry, the adapter's alpha, or (no metadata)
    the rank, which is what diffusers assumes for a file without alphas."""
    if found is None:
        return float(down.shape[0])
    for pattern, value in found["pattern"].items():
        if module == pattern or module.endswith("." + pattern):
            return float(value)
    return found["alpha"]


def check_kohya_names(family: Any, state: dict[str, torch.Tensor], adapters: str | None = None) -> None:
    """The kohya format names the parts of families that have kohya names (SD, SDXL); a
    file adapting other parts (a transformer: Flux, CogView4) is refused with what is written.
    `adapters`: "LoKr"/"LoHa" for peft adapters (the LyCORIS export), whose refusal says how
    they load instead."""
    from difftune.families import families

    named = sorted(name for name, f in families().items() if f.kohya_prefixes)
    parts = sorted({key.split(".", 1)[0] for key in state} - set(family.kohya_prefixes))
    if not family.kohya_prefixes or parts:
        kind = adapters or "LoRA"
        what = f"a {family.description} {kind}" if not family.kohya_prefixes else f"a {kind} of the {', '.join(parts)}"
        instead = ("Use its pytorch_lora_weights.safetensors as it is (diffusers' load_lora_weights and ComfyUI "
                   "read it), or --format diffusers") if adapters is None else (
                   "Load its final/ with peft as the model card shows (`difftune generate --lora RUN` does)")
        raise ValueError(f"{what} has no kohya names that difftune writes: the kohya format is written for "
                         f"{', '.join(repr(n) for n in named)} {'LoRAs' if adapters is None else 'adapters'} "
                         f"(a UNet and CLIP text encoders). {instead}")


def run_model(source: Path) -> dict:
    """The [model] section of the run whose final/ holds the file, or is the folder ({} if
    it is not in a run)."""
    from difftune.rundir import run_config

    return (run_config(str(source if source.is_dir() else source.parent)) or {}).get("model", {})


def lora_family(source: Path, state: dict[str, torch.Tensor], given: str | None = None) -> str:
    """The family a LoRA file (or adapter folder) was trained on: given, the run's (the file
    sits in a run's final/, the folder is it), or the one whose adapted parts the file's
    keys name."""
    if given is not None:
        return given
    model = run_model(source)
    if model:
        return model.get("family", "sd")
    # a file alone: the smallest family whose adapted parts cover the file's (a second text
    # encoder's keys: SDXL)
    from difftune.families import families

    parts = {key.split(".", 1)[0] for key in state}
    fitting = [f for f in families().values() if parts <= set(f.kohya_prefixes)]
    return min(fitting, key=lambda f: len(f.kohya_prefixes)).name if fitting else "sd"


def original_unet_namer(family: Any, source: Path, base: str | None) -> Callable[[str], str]:
    """The family's UNet module names in its original layout (family.original_unet_names),
    from the UNet config of the base the LoRA was trained on."""
    base = base or run_model(source).get("pretrained")
    config = _unet_config(base) if base else None
    if config is None:
        raise ValueError(f"the {family.description} UNet's original module names come from its config: give --base "
                         "(the pipeline the LoRA was trained on, a local folder or a cached Hub id)")
    return family.original_unet_names(config)


def _unet_config(base: str) -> dict | None:
    path = Path(base).expanduser() / "unet" / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(base, "unet/config.json"))
        except Exception:  # noqa: BLE001 (not a Hub id, not cached, offline: all mean "no config")
            return None
    return json.loads(path.read_text())


def adapter_folder(run_or_folder: str | Path) -> Path | None:
    """The folder of peft adapters (LoKr, LoHa: `<part>/adapter_config.json`) that a run
    directory, its final/ or the folder itself is; None for anything else (a LoRA file,
    a LoRA run)."""
    from difftune.results import adapter_parts
    from difftune.rundir import stands_for

    path = Path(run_or_folder).expanduser()
    if not path.is_dir():
        return None
    folder = stands_for(path)
    return folder if adapter_parts(folder) else None


def export_lora(run_or_file: str | Path, out_file: str | Path, format: str = "kohya",
                family: str | None = None, base: str | None = None) -> Path:
    """Write a run's LoRA in `format` ("kohya" or "diffusers"), atomically; kohya names
    with the prefixes and UNet names of `family` (default: see lora_family); `base`: the
    pipeline it was trained on, when the family names UNet modules by the original layout.
    A LoKr/LoHa run (or its final/) is written as one LyCORIS file (export_adapters)."""
    from difftune.families import get_family

    if format not in ("kohya", "diffusers"):
        raise ValueError(f"unknown LoRA format {format!r} (kohya or diffusers)")
    folder = adapter_folder(run_or_file)
    if folder is not None:
        state, metadata = export_adapters(folder, format, family, base)
        return _write(state, metadata, out_file)
    source = lora_file(run_or_file)
    state = read_tensors(source)
    if format == "kohya":
        chosen = get_family(lora_family(source, state, family))
        check_kohya_names(chosen, state)
        unet_names = original_unet_namer(chosen, source, base) if chosen.kohya_unet_names == "original" else None
        state = to_kohya(state, adapter_alphas(source), chosen.kohya_prefixes, unet_names)
        metadata = {"format": "pt", "ss_network_module": "networks.lora"}
    else:
        metadata = read_metadata(source) or {"format": "pt"}
    return _write(state, metadata, out_file)


def export_adapters(folder: Path, format: str, family: str | None = None,
                    base: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoKr/LoHa final/ (peft's folder per part) as one LyCORIS state in kohya module
    names (the family's prefixes; SDXL's UNet in its original names, as for a LoRA), with
    its metadata. Only "kohya": diffusers' LoRA format has no LoKr or LoHa."""
    from difftune.export.lycoris import to_lycoris
    from difftune.families import get_family
    from difftune.results import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_parts, read_adapter_config

    parts = adapter_parts(folder)
    configs = {part: read_adapter_config(folder / part / ADAPTER_CONFIG) for part in parts}
    kinds = sorted({str(config["peft_type"]) for config in configs.values()})
    label = " and ".join({"LOKR": "LoKr", "LOHA": "LoHa"}.get(kind, kind) for kind in kinds)
    if format != "kohya":
        raise ValueError(f"{folder} holds peft {label} adapters (<part>/{ADAPTER_WEIGHTS}), and there is no "
                         f"{format} LoRA file of them: diffusers' load_lora_weights reads no LoKr or LoHa. Export "
                         "--format kohya (LyCORIS names, which ComfyUI and A1111 read), or load the folder with "
                         "peft as the model card shows (`difftune generate --lora RUN` does)")
    states = {part: read_tensors(folder / part / ADAPTER_WEIGHTS) for part in parts}
    named = {f"{part}.{key}": tensor for part, state in states.items() for key, tensor in state.items()}
    chosen = get_family(lora_family(folder, named, family))
    check_kohya_names(chosen, named, label)
    unet_names = original_unet_namer(chosen, folder, base) if chosen.kohya_unet_names == "original" else None
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        def module_name(module: str, part: str = part) -> str:
            return kohya_module_name(part, module, chosen.kohya_prefixes, unet_names)

        try:
            out |= to_lycoris(states[part], configs[part], module_name)
        except ValueError as error:
            raise ValueError(f"{folder / part}: {error}") from None
    # what LyCORIS' kohya-style training writes (readers go by the key names)
    algo = ",".join(kind.lower() for kind in kinds)
    return out, {"format": "pt", "ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo})}


def _write(state: dict[str, torch.Tensor], metadata: dict[str, str], out_file: str | Path) -> Path:
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    save_file(state, partial, metadata=metadata)
    apply_umask(partial)
    os.replace(partial, out)
    return out
