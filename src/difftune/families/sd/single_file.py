"""One-file Stable Diffusion checkpoints in the original CompVis/LDM layout.

Many tools (A1111, ComfyUI, `StableDiffusionPipeline.from_single_file`) want one
`.safetensors` file rather than a diffusers folder. This module writes that file from a
diffusers SD 1.x / 2.x folder (`unet/`, `vae/`, `text_encoder/`, each with `config.json`
and `diffusion_pytorch_model.safetensors` / `model.safetensors`; pickled `.bin` weights
are refused, see difftune/weights.py).

The layout written, by component (the inverse of what diffusers'
`loaders/single_file_utils.py` reads back):

UNet -> `model.diffusion_model.*`
    `input_blocks.0.0` = conv_in; then, for each down block i, `layers_per_block` entries
    `input_blocks.k.0` (resnet) and `input_blocks.k.1` (the Transformer2DModel, only in
    cross-attention blocks), then `input_blocks.k.0.op` (the downsampler) unless i is the
    last block. `middle_block.0/1/2` = resnet / attention / resnet. Each up block has
    `layers_per_block + 1` entries `output_blocks.k.0` (resnet), `.1` (attention), and
    its upsampler at `.1.conv` or, after an attention, `.2.conv`. `time_embed.0/2`,
    `out.0` = conv_norm_out, `out.2` = conv_out. Inside a resnet: norm1 -> in_layers.0,
    conv1 -> in_layers.2, time_emb_proj -> emb_layers.1, norm2 -> out_layers.0,
    conv2 -> out_layers.3, conv_shortcut -> skip_connection. Attention internals keep
    their names (LDM's SpatialTransformer and diffusers' Transformer2DModel agree).
VAE -> `first_stage_model.*`
    `encoder.down.i.block.j`, `encoder.down.i.downsample.conv`; the decoder's up blocks
    are numbered from the bottom: diffusers `up_blocks.i` -> `decoder.up.{n-1-i}`
    (`.block.j`, `.upsample.conv`); `mid.block_1/2`, `mid.attn_1` with norm/q/k/v/proj_out
    stored as 1x1 conv weights; conv_norm_out -> norm_out; conv_shortcut -> nin_shortcut;
    `quant_conv` / `post_quant_conv` at the top.
Text encoder, SD 1.x (OpenAI CLIP) -> `cond_stage_model.transformer.text_model.*`
    the transformers CLIPTextModel keys as they are.
Text encoder, SD 2.x (OpenCLIP) -> `cond_stage_model.model.*`
    token_embedding.weight, positional_embedding, ln_final, and
    `transformer.resblocks.i.{ln_1,ln_2,attn.out_proj,mlp.c_fc,mlp.c_proj}` with q/k/v
    concatenated into `attn.in_proj_weight` / `attn.in_proj_bias`. A diffusers SD2 text
    encoder already lacks OpenCLIP's last block (SD2 uses the penultimate layer), and has no
    text_projection, so neither is written.

Which text layout: a diffusers folder does not say "SD2", but the text encoder's
`hidden_act` does. OpenAI's CLIP (SD 1.x) was trained with QuickGELU ("quick_gelu"),
LAION's OpenCLIP ViT-H (SD 2.x) with exact GELU ("gelu"), and the loader takes the
activation from the config folder, not the file, so this one field is what must agree
with the family. `text_layout=` overrides it for unusual folders.

Every mapping is computed from the component configs (block counts, layers per block,
which blocks have attention), never a fixed 4x2 SD shape, and every source weight must be
consumed: a key with no place in the layout is an error, not a silent drop.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difftune.layouts.rules import ConvLeaves, Rule, apply_rules, load_component, save_atomic, to_half
from difftune.layouts.text_encoders import clip_state, open_clip_state

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Leaf-module renames inside one block (diffusers name -> LDM name).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
VAE_ATTENTION = ConvLeaves({
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
})

# Block types the LDM layout (and diffusers' reader of it) has a place for: name -> has attention.
UNET_DOWN = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
UNET_UP = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
VAE_DOWN, VAE_UP = {"DownEncoderBlock2D"}, {"UpDecoderBlock2D"}
TEXT_LAYOUTS = {"quick_gelu": "clip", "gelu": "open_clip"}

def export_single_file(
    pipeline_dir: str | Path,
    out_file: str | Path,
    half: bool = False,
    *,
    text_layout: str | None = None,
) -> Path:
    """Write the pipeline folder's UNet, VAE and text encoder as one LDM-layout safetensors file.

    half=True stores floating tensors as fp16. text_layout ("clip" or "open_clip") overrides
    the SD1/SD2 choice read from the text encoder's hidden_act. Returns the written path.
    """
    state = single_file_state_dict(pipeline_dir, text_layout=text_layout)
    return save_atomic(to_half(state) if half else state, Path(out_file))


def single_file_state_dict(
    pipeline_dir: str | Path, *, text_layout: str | None = None
) -> dict[str, torch.Tensor]:
    """The whole LDM-layout state dict of a diffusers SD 1.x/2.x folder (nothing written)."""
    root = Path(pipeline_dir)
    if not root.is_dir():
        raise ValueError(f"pipeline folder {root} does not exist")
    unet_config, unet = load_component(root, "unet")
    vae_config, vae = load_component(root, "vae")
    text_config, text = load_component(root, "text_encoder")
    state: dict[str, torch.Tensor] = {}
    state.update(apply_rules(unet, unet_rules(unet_config), UNET_PREFIX, root / "unet"))
    state.update(apply_rules(vae, vae_rules(vae_config), VAE_PREFIX, root / "vae"))
    layout = text_layout or _text_layout(text_config, root / "text_encoder")
    if layout == "clip":
        state.update(clip_state(text, root / "text_encoder"))
    elif layout == "open_clip":
        state.update(open_clip_state(text, root / "text_encoder"))
    else:
        raise ValueError(f"text_layout must be 'clip' or 'open_clip', not {layout!r}")
    return state


# ---------------------------------------------------------------- reading the folder


def _text_layout(config: dict, folder: Path) -> str:
    """'clip' (SD 1.x) or 'open_clip' (SD 2.x), from the activation the encoder was trained with."""
    act = config.get("hidden_act")
    if act not in TEXT_LAYOUTS:
        raise ValueError(
            f"{folder}/config.json has hidden_act={act!r}; cannot tell OpenAI CLIP (quick_gelu, "
            "SD 1.x) from OpenCLIP (gelu, SD 2.x): pass text_layout='clip' or 'open_clip'"
        )
    return TEXT_LAYOUTS[act]


# ---------------------------------------------------------------- UNet and VAE rules


def _block_kinds(types: list[str], known: dict[str, bool], folder: str) -> list[bool]:
    """Per block, whether it holds attentions; unknown types have no place in the LDM layout."""
    unknown = [t for t in types if t not in known]
    if unknown:
        raise ValueError(
            f"{folder}: block types {unknown} have no LDM single-file layout (known: {list(known)})"
        )
    return [known[t] for t in types]


def uniform_layers(config: dict) -> int:
    """layers_per_block as one int: diffusers' reader assumes the same count in every block."""
    layers = config["layers_per_block"]
    if isinstance(layers, int):
        return layers
    if len(set(layers)) != 1:
        raise ValueError(
            f"unet layers_per_block={layers}: the single-file layout needs one count for all blocks"
        )
    return layers[0]


def unet_rules(config: dict) -> list[Rule]:
    """Prefix rules for a UNet2DConditionModel, walked block by block as LDM numbers them."""
    layers = uniform_layers(config)
    up = _block_kinds(config["up_block_types"], UNET_UP, "unet")
    rules = unet_encoder_rules(config) + [
        ("conv_norm_out.", "out.0.", None),
        ("conv_out.", "out.2.", None),
    ]
    k = 0
    for i, attends in enumerate(up):
        for j in range(layers + 1):  # up blocks also take the skip from each downsampler
            rules.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", UNET_RESNET))
            if attends:
                rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", None))
            if j == layers and i < len(up) - 1:  # upsampler sits after the block's last layer
                slot = 2 if attends else 1
                rules.append(
                    (f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{slot}.conv.", None)
                )
            k += 1
    return rules


def unet_encoder_rules(config: dict) -> list[Rule]:
    """conv_in, the time embedding, the down blocks (input_blocks) and the mid block: the
    half of a UNet that a ControlNet copies, named the same in both LDM layouts."""
    layers = uniform_layers(config)
    down = _block_kinds(config["down_block_types"], UNET_DOWN, "unet")
    rules: list[Rule] = [
        ("conv_in.", "input_blocks.0.0.", None),
        ("time_embedding.linear_1.", "time_embed.0.", None),
        ("time_embedding.linear_2.", "time_embed.2.", None),
    ]
    k = 1  # input_blocks.0 is conv_in
    for i, attends in enumerate(down):
        for j in range(layers):
            rules.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", UNET_RESNET))
            if attends:
                rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", None))
            k += 1
        if i < len(down) - 1:  # diffusers adds a downsampler to every block but the last
            rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op.", None))
            k += 1
    return rules + _unet_mid_rules(config)


def _unet_mid_rules(config: dict) -> list[Rule]:
    """middle_block.0/1/2: the only mid block the LDM layout has is resnet-attention-resnet."""
    kind = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if kind is None:
        return []
    if kind != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"unet mid_block_type={kind!r} has no LDM single-file layout")
    return [
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", None),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET),
    ]


def vae_rules(config: dict) -> list[Rule]:
    """Prefix rules for an AutoencoderKL (encoder counts up, decoder counts down)."""
    _block_kinds(config["down_block_types"], dict.fromkeys(VAE_DOWN, False), "vae")
    _block_kinds(config["up_block_types"], dict.fromkeys(VAE_UP, False), "vae")
    layers, n = config["layers_per_block"], len(config["down_block_types"])
    rules: list[Rule] = [
        ("quant_conv.", "quant_conv.", None),
        ("post_quant_conv.", "post_quant_conv.", None),
    ]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", None),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", None),
            (f"{part}.conv_out.", f"{part}.conv_out.", None),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
        ]
        if config.get("mid_block_add_attention", True):
            rules.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION))
    for i in range(n):
        for j in range(layers):
            rules.append(
                (
                    f"encoder.down_blocks.{i}.resnets.{j}.",
                    f"encoder.down.{i}.block.{j}.",
                    VAE_RESNET,
                )
            )
        if i < n - 1:
            rules.append(
                (
                    f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                    f"encoder.down.{i}.downsample.conv.",
                    None,
                )
            )
    for i in range(len(config["up_block_types"])):
        ldm = n - 1 - i  # LDM numbers decoder levels by resolution, lowest first
        for j in range(layers + 1):
            rules.append(
                (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{ldm}.block.{j}.", VAE_RESNET)
            )
        if i < n - 1:
            rules.append(
                (
                    f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                    f"decoder.up.{ldm}.upsample.conv.",
                    None,
                )
            )
    return rules
