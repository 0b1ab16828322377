"""A trained ControlNet as one file in the original ControlNet layout (lllyasviel's
`control_model.*`), which A1111, ComfyUI and `ControlNetModel.from_single_file` read.

The layout, from a diffusers ControlNetModel:
- the copied UNet half keeps the LDM names of the single-file UNet (`input_blocks`,
  `middle_block`, `time_embed`: families/sd/single_file.py's rules);
- `controlnet_cond_embedding.conv_in` -> `input_hint_block.0`, its blocks i ->
  `input_hint_block.{2i+2}` (the odd slots are SiLUs), `conv_out` -> the slot after them;
- `controlnet_down_blocks.i` -> `zero_convs.i.0`, `controlnet_mid_block` -> `middle_block_out.0`.

The original layout has six conditioning-embedding convolutions (its conv_out at slot 14,
where diffusers' reader looks for it), which is what a base whose VAE downsamples x8
gets. A ControlNet of a base with another VAE factor has another count and no place in
that layout: its export is refused with the reason, never written wrong.
"""

from __future__ import annotations

from pathlib import Path

from difftune.families.sd.single_file import unet_encoder_rules
from difftune.layouts.rules import Rule, apply_rules, load_component, save_atomic

PREFIX = "control_model."
HINT_BLOCKS = 6  # the original layout's conditioning embedding: conv_out at input_hint_block.14


def controlnet_rules(config: dict) -> list[Rule]:
    blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    if blocks != HINT_BLOCKS:
        raise ValueError(
            f"its conditioning embedding has {blocks} convolutions between conv_in and conv_out "
            f"(conditioning_embedding_out_channels = {config['conditioning_embedding_out_channels']}); the "
            f"original ControlNet layout, and diffusers' reader of it, has {HINT_BLOCKS} (a base whose VAE "
            "downsamples x8). Use the diffusers folder as it is (ControlNetModel.from_pretrained)")
    if config.get("class_embed_type") or config.get("addition_embed_type"):
        raise ValueError("class or added embeddings (SDXL) have no place in the SD ControlNet layout")
    rules = unet_encoder_rules(config) + [
        ("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", None),
        ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * blocks + 2}.", None),
        ("controlnet_mid_block.", "middle_block_out.0.", None),
    ]
    rules += [(f"controlnet_cond_embedding.blocks.{i}.", f"input_hint_block.{2 * i + 2}.", None)
              for i in range(blocks)]
    rules += [(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", None) for i in range(_input_blocks(config))]
    return rules


def _input_blocks(config: dict) -> int:
    """One zero convolution per input block: conv_in, each layer, each downsampler."""
    layers = config["layers_per_block"]
    layers = layers if isinstance(layers, int) else layers[0]
    blocks = len(config["down_block_types"])
    return 1 + blocks * layers + blocks - 1


def export_controlnet(folder: str | Path, out_file: str | Path, half: bool = False) -> Path:
    """Write the ControlNet folder (config.json + weights; a run's final/) as one file."""
    root = Path(folder)
    config, state = load_component(root.parent, root.name)
    found = str(config.get("_class_name", "model of unknown class"))
    if "ControlNet" not in found:
        raise ValueError(f"{root} holds a {found}, not a ControlNet")
    if found != "ControlNetModel":  # FluxControlNetModel, SD3ControlNetModel...: no such layout
        raise ValueError(f"{root} holds a {found}; the original single-file ControlNet layout (control_model.*) "
                         "exists for SD 1.x/2.x ControlNets (ControlNetModel) only. Use the folder as it is "
                         f"({found}.from_pretrained), which diffusers and ComfyUI read")
    converted = apply_rules(state, controlnet_rules(config), PREFIX, root)
    if half:
        converted = {k: v.half() if v.is_floating_point() else v for k, v in converted.items()}
    return save_atomic(converted, Path(out_file))
