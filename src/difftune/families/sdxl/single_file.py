"""One-file SDXL checkpoints in the original Stability (SGM) layout.

`StableDiffusionXLPipeline.from_single_file`, A1111 and ComfyUI read SDXL as one
`.safetensors` file. This module writes that file from a diffusers SDXL folder (`unet/`,
`vae/`, `text_encoder/` = CLIPTextModel, `text_encoder_2/` = CLIPTextModelWithProjection).

The layout, by component (the inverse of diffusers' `loaders/single_file_utils.py`):

UNet -> `model.diffusion_model.*`, as for SD (single_file.py's rules), plus the added
    condition (pooled text and size/crop embedding): diffusers' `add_embedding.linear_1/2`
    -> `label_emb.0.0` / `label_emb.0.2` (SGM's Sequential(Sequential(Linear, SiLU, Linear))).
    Each attention's `transformer_blocks.N` keep their names however many there are.
VAE -> `first_stage_model.*`, exactly as for SD.
Text encoder 1 (OpenAI CLIP ViT-L) -> `conditioner.embedders.0.transformer.text_model.*`,
    the CLIPTextModel keys as they are.
Text encoder 2 (OpenCLIP ViT-bigG) -> `conditioner.embedders.1.model.*`, OpenCLIP names with
    q/k/v fused into `attn.in_proj_*` (as for SD 2.x, text_layouts.py), all layers kept (SDXL
    reads the penultimate one at run time), and `text_projection` = the transpose of
    transformers' `text_projection.weight`.

Block counts, layers per block, which blocks attend and each attention's transformer depth
come from unet/config.json; every source weight must be placed, or the error names it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from difftune.families.sd.single_file import UNET_DOWN, UNET_PREFIX, UNET_UP, VAE_PREFIX, uniform_layers, unet_rules, vae_rules
from difftune.layouts.rules import Rule, apply_rules, load_component, save_atomic, to_half
from difftune.layouts.text_encoders import clip_state, open_clip_state

CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
PROJECTION = "text_projection.weight"
ADDED_EMBEDDING: list[Rule] = [
    ("add_embedding.linear_1.", "label_emb.0.0.", None),
    ("add_embedding.linear_2.", "label_emb.0.2.", None),
]
DEPTH = re.compile(r"(.+\.attentions\.\d+)\.transformer_blocks\.(\d+)\.")


def export_sdxl_single_file(
    pipeline_dir: str | Path, out_file: str | Path, half: bool = False
) -> Path:
    """Write the SDXL folder's UNet, VAE and both text encoders as one SGM-layout safetensors
    file (written beside out_file, then renamed). half=True stores floating tensors as fp16."""
    state = sdxl_single_file_state_dict(pipeline_dir)
    return save_atomic(to_half(state) if half else state, Path(out_file))


def sdxl_single_file_state_dict(pipeline_dir: str | Path) -> dict[str, torch.Tensor]:
    """The whole SGM-layout state dict of a diffusers SDXL folder (nothing written)."""
    root = Path(pipeline_dir)
    if not root.is_dir():
        raise ValueError(f"pipeline folder {root} does not exist")
    unet_config, unet = load_component(root, "unet")
    vae_config, vae = load_component(root, "vae")
    clip_config, clip = load_component(root, "text_encoder")
    big_config, big = load_component(root, "text_encoder_2")
    _check_encoder_widths(clip_config, big_config, root)
    state = apply_rules(
        unet, sdxl_unet_rules(unet_config, root / "unet"), UNET_PREFIX, root / "unet"
    )
    check_depths(unet_config, unet, root / "unet")  # after the rules: they name unknown blocks
    state.update(apply_rules(vae, vae_rules(vae_config), VAE_PREFIX, root / "vae"))
    state.update(clip_state(clip, root / "text_encoder", CLIP_PREFIX))
    state.update(projected_open_clip_state(big, root / "text_encoder_2"))
    return state


def sdxl_unet_rules(config: dict, folder: Path = Path("unet")) -> list[Rule]:
    """SD's UNet rules plus SDXL's added-condition MLP (a UNet without one is not SDXL)."""
    kind = config.get("addition_embed_type")
    if kind != "text_time":
        raise ValueError(
            f"{folder}/config.json has addition_embed_type={kind!r}: an SDXL UNet takes the "
            "pooled text and image sizes through 'text_time' (label_emb in the SGM layout)"
        )
    return unet_rules(config) + ADDED_EMBEDDING


def _check_encoder_widths(clip_config: dict, big_config: dict, root: Path) -> None:
    """diffusers' reader tells the two encoders apart only by width: it gives each model the
    embedders whose positional embedding has its hidden size, checking embedders.0 first. With
    equal widths text_encoder_2 got text_encoder's layers and kept text_projection unloaded (on
    the meta device, seen with diffusers 0.42), so no such file is written."""
    width = clip_config.get("hidden_size")
    if width == big_config.get("hidden_size"):
        raise ValueError(
            f"{root}: text_encoder and text_encoder_2 both have hidden_size={width}; "
            "StableDiffusionXLPipeline.from_single_file would read text_encoder_2 from "
            "text_encoder's weights. Use the diffusers folder as it is (from_pretrained)"
        )


def projected_open_clip_state(
    state: dict[str, torch.Tensor], folder: Path
) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout under conditioner.embedders.1.model."""
    rest = dict(state)
    projection = rest.pop(PROJECTION, None)
    if projection is None:
        raise ValueError(
            f"{folder}: no {PROJECTION}; SDXL's second text encoder is a "
            "CLIPTextModelWithProjection (its pooled, projected output conditions the UNet)"
        )
    out = open_clip_state(rest, folder, OPEN_CLIP_PREFIX)
    # OpenCLIP computes x @ text_projection, so it stores [hidden, projection]: the transpose of
    # a Linear weight. diffusers' reader transposes it back, and splits each fused in_proj by
    # text_projection.shape[0], which is the hidden size only this way round.
    out[OPEN_CLIP_PREFIX + "text_projection"] = projection.T.contiguous()
    return out


# ---------------------------------------------------------------- transformer depth


def check_depths(config: dict, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Each attention's transformer_blocks count must be the one config.json gives.

    The names pass through unchanged whatever the depth, so a weight file deeper or shallower
    than its config would be written without complaint and read back into a model built
    from that config: wrong, or failing far from the cause. Checked here instead.
    """
    expected = expected_depths(config)
    found: dict[str, int] = {}
    for key in state:
        match = DEPTH.match(key)
        if match:
            found[match[1]] = max(found.get(match[1], 0), int(match[2]) + 1)
    wrong = [
        f"{name}: {expected.get(name, 0)} in config.json, {count} in the weights"
        for name, count in sorted(found.items())
        if expected.get(name, 0) != count
    ]
    if wrong:
        raise ValueError(f"{folder}: transformer depth disagrees: {'; '.join(wrong[:5])}")


def expected_depths(config: dict) -> dict[str, int]:
    """{attention prefix: transformer_blocks count}, built the way UNet2DConditionModel builds
    them: per down block an int (every layer) or a list (per layer); up blocks reversed unless
    reverse_transformer_layers_per_block says otherwise; the mid block takes the last entry."""
    layers = uniform_layers(config)
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    per_block = config.get("transformer_layers_per_block", 1)
    down = [per_block] * len(down_types) if isinstance(per_block, int) else list(per_block)
    up = config.get("reverse_transformer_layers_per_block") or down[::-1]
    depths: dict[str, int] = {}
    for part, types, values, count, known in [
        ("down_blocks", down_types, down, layers, UNET_DOWN),
        ("up_blocks", up_types, up, layers + 1, UNET_UP),
    ]:
        for i, (kind, value) in enumerate(zip(types, values, strict=True)):
            for j in range(count if known.get(kind) else 0):
                depths[f"{part}.{i}.attentions.{j}"] = _layer_depth(value, j)
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        depths["mid_block.attentions.0"] = _layer_depth(down[-1], 0)
    return depths


def _layer_depth(value: int | list[int], layer: int) -> int:
    return value if isinstance(value, int) else value[layer]
