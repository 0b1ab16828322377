"""The `difftune export` verbs: a LoRA in another key format, a pipeline or a ControlNet
as one original-layout file. Only argparse is imported until a verb runs (`difftune
--help` stays fast)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from difftune.errors import InputError

console = Console(stderr=True, log_path=False)


def cmd_export_lora(args: argparse.Namespace) -> int:
    from difftune.paths import check_output_file

    check_output_file("out", args.out, (".safetensors",), args.overwrite)
    from difftune.paths import check_not_an_input, is_kohya, lora_file

    from difftune.export.lora import adapter_folder

    adapters = adapter_folder(args.source)  # a LoKr/LoHa run: one LyCORIS file out
    source = adapters if adapters is not None else lora_file("source", args.source)
    check_not_an_input("out", args.out, {"the source": source})
    if adapters is None and is_kohya(source) and args.format == "kohya":
        raise InputError(f"source = {args.source!r} is already in the kohya format")
    from difftune.families import families

    if args.family is not None and args.family not in families():
        raise InputError(f"--family {args.family!r} is unknown; difftune has {', '.join(sorted(families()))}")
    from difftune.export.lora import export_lora

    try:
        out = export_lora(source, args.out, args.format, args.family, args.base)
    except ValueError as error:
        raise InputError(f"{source}: {error}") from None
    console.print(f"wrote {out} ({args.format} format)")
    return 0


def cmd_export_single_file(args: argparse.Namespace) -> int:
    from difftune.families import family_of_pipeline
    from difftune.rundir import model_source
    from difftune.paths import (
        check_finished_run,
        check_not_an_input,
        check_output_file,
        check_pipeline,
    )

    check_output_file("out", args.out, (".safetensors",), args.overwrite)
    check_finished_run("pipeline", args.pipeline)
    pipeline = model_source(args.pipeline)
    check_not_an_input("out", args.out, {"the pipeline": pipeline})
    family = family_of_pipeline(Path(pipeline))
    if family is None:
        check_pipeline("pipeline", pipeline, {})  # names what the folder is, if not a pipeline
        raise InputError(f"pipeline = {pipeline!r}: its model_index.json names a pipeline class no difftune family "
                         "exports")
    if "single_file" not in family.capabilities:
        raise InputError(f"pipeline = {pipeline!r} is a {family.description} pipeline, whose single-file layout "
                         "difftune does not write yet; its diffusers folder is what loads it")
    weighted = {name: kind for name, kind in family.components.items() if kind == "model"}
    check_pipeline("pipeline", pipeline, weighted)
    try:
        out = family.export_single_file(Path(pipeline), Path(args.out), args.half)
    except (ValueError, FileNotFoundError) as error:
        raise InputError(f"{pipeline}: {error}") from None
    console.print(f"wrote {out}")
    return 0


def cmd_export_controlnet(args: argparse.Namespace) -> int:
    from difftune.rundir import model_source
    from difftune.paths import check_model_folder, check_not_an_input, check_output_file

    check_output_file("out", args.out, (".safetensors",), args.overwrite)
    check_model_folder("controlnet", args.controlnet, "ControlNet")
    from difftune.families.sd.controlnet_file import export_controlnet

    folder = model_source(args.controlnet)
    check_not_an_input("out", args.out, {"the ControlNet": folder})
    try:
        out = export_controlnet(folder, args.out, half=args.half)
    except ValueError as error:
        raise InputError(f"{folder}: {error}") from None
    console.print(f"wrote {out} (the original ControlNet layout, control_model.*)")
    return 0


def add_export_verbs(verbs: Any) -> None:
    export = verbs.add_parser("export", help="convert trained weights").add_subparsers(
        dest="export_verb", required=True)
    lora = _export_verb(export, "lora", "a LoRA in another key format", cmd_export_lora,
                        ("source", "LoRA run directory, its final/, or a .safetensors file"), half=False)
    lora.add_argument("--format", choices=["kohya", "diffusers"], default="kohya",
                      help="kohya: sd-scripts / AUTOMATIC1111 / ComfyUI keys")
    lora.add_argument("--family", help="the base's family, for the kohya names (default: the run's; a file "
                      "alone: sdxl if it adapts a second text encoder, else sd)")
    lora.add_argument("--base", help="SDXL: the pipeline the LoRA was trained on, whose UNet config gives the "
                      "original module names (default: the run's model.pretrained)")
    _export_verb(export, "single-file", "an SD1.x/2.x or SDXL pipeline as one original-layout checkpoint",
                 cmd_export_single_file, ("pipeline", "diffusers pipeline folder, or a full fine-tune's run directory"))
    _export_verb(export, "controlnet", "a ControlNet as one file in the original layout (A1111, ComfyUI)",
                 cmd_export_controlnet, ("controlnet", "a ControlNet run directory, its final/, or a ControlNet folder"))


def _export_verb(export: Any, name: str, help: str, run: Any, source: tuple[str, str], half: bool = True) -> Any:
    """One `export` verb: its source, an output .safetensors file, --overwrite (and --half)."""
    verb = export.add_parser(name, help=help)
    verb.add_argument(source[0], help=source[1])
    verb.add_argument("out", help="output .safetensors file")
    verb.add_argument("--overwrite", action="store_true", help="replace out if it exists")
    if half:
        verb.add_argument("--half", action="store_true", help="store fp16 weights")
    verb.set_defaults(run=run)
    return verb
