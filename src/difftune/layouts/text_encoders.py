"""The text encoder of a single-file SD checkpoint: OpenAI CLIP's keys as they are (SD 1.x),
or OpenCLIP's names with each layer's q/k/v fused (SD 2.x); SDXL has one of each, under its
own prefixes. See families/sd/single_file.py and families/sdxl/single_file.py."""

from __future__ import annotations

import re
from pathlib import Path

import torch

CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def check_consumed(
    source: dict, out: dict, unmapped: list[str], folder: Path, count: bool = True
) -> None:
    """Never drop a weight silently: no unplaced keys, and (count) one output key per input key."""
    if unmapped:
        shown = ", ".join(unmapped[:10]) + (
            f" (+{len(unmapped) - 10} more)" if len(unmapped) > 10 else ""
        )
        raise ValueError(
            f"{folder}: {len(unmapped)} diffusers keys have no place in the LDM layout: {shown}"
        )
    assert not count or len(out) == len(source), (
        f"{folder}: {len(source)} keys in, {len(out)} out (keys collided)"
    )


def _text_key(key: str) -> str:
    """transformers >= 5.6 saves CLIPTextModel flattened; older folders nest it under text_model."""
    return key.removeprefix("text_model.")


def clip_state(
    state: dict[str, torch.Tensor], folder: Path, prefix: str = CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """The CLIPTextModel's own keys under prefix (SD 1.x: cond_stage_model.transformer.text_model.;
    SDXL's first encoder: conditioner.embedders.0.transformer.text_model.)."""
    out, unmapped = {}, []
    for key, tensor in state.items():
        name = _text_key(key)
        if name.split(".")[0] in ("embeddings", "encoder", "final_layer_norm"):
            out[prefix + name] = tensor
        else:
            unmapped.append(key)  # e.g. a CLIPTextModelWithProjection's text_projection
    check_consumed(state, out, unmapped, folder)
    return out


def open_clip_state(
    state: dict[str, torch.Tensor], folder: Path, prefix: str = OPEN_CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """OpenCLIP names under prefix, with each layer's q/k/v fused into one in_proj tensor
    (SD 2.x: cond_stage_model.model.; SDXL's second encoder: conditioner.embedders.1.model.)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # in_proj name -> {"q"|"k"|"v": tensor}
    unmapped: list[str] = []
    dropped = 0
    for key, tensor in state.items():
        name = _text_key(key)
        if name == "embeddings.position_ids":
            _check_position_ids(tensor, folder)  # a derived arange buffer; OpenCLIP has none
            dropped += 1
            continue
        placed = _open_clip_name(name)
        if placed is None:
            unmapped.append(key)
        elif placed[1] is None:
            out[prefix + placed[0]] = tensor
        else:
            fused.setdefault(placed[0], {})[placed[1]] = tensor
    check_consumed(state, {}, unmapped, folder, count=False)
    count = len(out) + sum(len(parts) for parts in fused.values()) + dropped
    assert count == len(state), f"{folder}: {len(state)} keys in, {count} placed (keys collided)"
    for target, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(
                f"{folder}: {target} needs q, k and v projections, found {sorted(parts)}"
            )
        # OpenCLIP's nn.MultiheadAttention stores [q; k; v] stacked along the output dimension.
        out[prefix + target] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
QKV = re.compile(r"self_attn\.([qkv])_proj")


def _open_clip_name(name: str) -> tuple[str, str | None] | None:
    """(OpenCLIP name, q/k/v part or None) of one diffusers text-encoder key, or None."""
    if name in OPEN_CLIP_TOP:
        return OPEN_CLIP_TOP[name], None
    match = LAYER.fullmatch(name)
    if match is None:
        return None
    index, module, param = match.groups()
    block = f"transformer.resblocks.{index}."
    qkv = QKV.fullmatch(module)
    if qkv:
        return f"{block}attn.in_proj_{param}", qkv.group(1)
    return (
        (f"{block}{OPEN_CLIP_LAYER[module]}.{param}", None) if module in OPEN_CLIP_LAYER else None
    )


def _check_position_ids(tensor: torch.Tensor, folder: Path) -> None:
    """Dropping position_ids is only lossless if it is the plain 0..n-1 it is meant to be."""
    if not torch.equal(tensor.flatten().long(), torch.arange(tensor.numel())):
        raise ValueError(
            f"{folder}: embeddings.position_ids is not 0..n-1 and OpenCLIP has no place for it"
        )
