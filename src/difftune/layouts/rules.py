"""Renaming a diffusers component's state dict into an original checkpoint layout, the
machinery every family's single-file layout shares: a component read safely (safetensors
only), rules from diffusers prefixes to original ones, every key placed and every rule
filled, and the file written atomically. The layouts themselves live in the families
(families/sd/single_file.py, families/sdxl/single_file.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from difftune.files import apply_umask
from difftune.layouts.text_encoders import check_consumed
from difftune.weights import read_config, read_tensors

# First match wins. The .bin names are looked for only to say that such a folder's
# weights are pickled, which difftune/weights.py refuses to read.
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)

# (diffusers prefix, LDM prefix, leaf rename table or None for "names unchanged")
Rule = tuple[str, str, dict[str, str] | None]


class ConvLeaves(dict):
    """A leaf rename table whose linears the original layout stores as 1x1 convs."""


def load_component(root: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of one component folder, with errors naming what is missing."""
    folder = root / name
    if not folder.is_dir():
        raise ValueError(
            f"component folder {folder} is missing (the pipeline needs {name}/)"
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} is missing")
    weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise ValueError(f"no weight file in {folder}: expected one of {', '.join(WEIGHT_NAMES)}")
    # read_tensors refuses a .bin (a pickle) by name, naming it, rather than reading it
    return read_config(config_path), read_tensors(weights)


def apply_rules(
    state: dict[str, torch.Tensor], rules: list[Rule], prefix: str, folder: Path
) -> dict[str, torch.Tensor]:
    """Rename every key by its rule; fail on keys no rule places and rules no key fills."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    unmapped: list[str] = []
    for key, tensor in state.items():
        placed = place(key, rules)
        if placed is None:
            unmapped.append(key)
            continue
        name, source, leaves = placed
        used.add(source)
        out[prefix + name] = as_conv(tensor) if isinstance(leaves, ConvLeaves) else tensor
    check_consumed(state, out, unmapped, folder)
    empty = [source for source, _, _ in rules if source not in used]
    if empty:
        raise ValueError(
            f"{folder}: config.json implies weights under {empty[:5]} but the weight file has none"
        )
    return out


def place(key: str, rules: list[Rule]) -> tuple[str, str, dict[str, str] | None] | None:
    """(LDM name, matched diffusers prefix, its leaf table) of one key; None if unplaced."""
    for source, target, leaves in rules:
        if not key.startswith(source):
            continue
        rest = key[len(source) :]
        if leaves is None:
            return target + rest, source, leaves
        module, _, param = rest.rpartition(".")
        return (target + leaves[module] + "." + param, source, leaves) if module in leaves else None
    return None


def as_conv(tensor: torch.Tensor) -> torch.Tensor:
    """A linear stored as a 1x1 conv (LDM's VAE attention): [o, i] -> [o, i, 1, 1]."""
    return tensor[:, :, None, None] if tensor.ndim == 2 else tensor


def to_half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 copies of the floating tensors; integer buffers (position_ids) stay as they are."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def save_atomic(state: dict[str, torch.Tensor], out: Path) -> Path:
    """Write to a temporary name beside out, then rename: readers never see half a file.

    Same folder, so os.replace is an atomic rename on one filesystem. The pid keeps two
    concurrent exports apart. safetensors (0.8) creates its file with mode 0600, so the
    umask's modes are applied before the rename.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}  # safetensors refuses strided views
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata={"format": "pt"})
        apply_umask(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
