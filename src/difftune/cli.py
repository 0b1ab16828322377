"""The `difftune` command: verbs mapped to API calls, no training logic here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from difftune.errors import InputError, UserError
from difftune.quiet import quiet_unrelated_warnings

console = Console(stderr=True)

def cmd_train(args: argparse.Namespace) -> int:
    from difftune.config import load_config

    values = {"train.resume": args.resume} if args.resume else {}
    config = load_config(args.config, list(args.set or []), values)  # before torch is imported
    from difftune.export import push_to_hub
    from difftune.training.loop import train

    final = train(config, console)
    if not _is_main_process():
        return 0
    if final is None:
        console.print("stopped early; run the same command again to continue")
        return 0
    console.print(f"[green]done[/green]: {final}")
    if config.hub.push:
        repo = push_to_hub(Path(config.train.output_dir), config)
        console.print(f"pushed to https://huggingface.co/{repo}")
    return 0


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def cmd_generate(args: argparse.Namespace) -> int:
    from difftune.generate import generate

    if (args.controlnet is None) != (args.image is None):
        raise InputError("--controlnet and --image go together")
    out = generate(
        base=args.base,
        prompt=args.prompt,
        out=args.out,
        controlnet=args.controlnet,
        image=args.image,
        lora=args.lora,
        lora_scale=args.lora_scale,
        steps=args.steps,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        conditioning_scale=args.conditioning_scale,
        negative_prompt=args.negative_prompt,
        resolution=args.resolution,
    )
    console.print(f"wrote {out}")
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    from difftune.export.lora import export_lora

    try:
        out = export_lora(args.source, args.out, args.format)
    except (ValueError, FileNotFoundError) as error:
        raise InputError(str(error)) from None
    console.print(f"wrote {out} ({args.format} format)")
    return 0


def cmd_export_single_file(args: argparse.Namespace) -> int:
    from difftune.export.single_file import export_single_file
    from difftune.generate import run_output

    try:
        out = export_single_file(run_output(args.pipeline), args.out, half=args.half)
    except (ValueError, FileNotFoundError) as error:
        raise InputError(str(error)) from None
    console.print(f"wrote {out}")
    return 0


def cmd_fill_circles(args: argparse.Namespace) -> int:
    from difftune.data.synthetic import DEMO_PALETTE, write_fill_circles, write_fill_circles_parquet

    palette = DEMO_PALETTE if args.palette == "demo" else None
    writer = write_fill_circles_parquet if args.parquet else write_fill_circles
    out = writer(args.out, args.n, args.resolution, args.seed, palette)
    console.print(f"wrote {args.n} fill-circles samples to {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Exit 0 when every row can be trained on, 1 when some cannot, 2 on a usage error."""
    from difftune.data.check import check_dataset, write_report

    source = Path(args.source)
    if source.suffix == ".toml" and source.is_file():
        from difftune.config import load_config
        from difftune.methods import make_method

        run = load_config(source, list(args.set or []))
        method = make_method(run.method)
        data, needs_conditioning, fixed = run.data, method.needs_conditioning, method.fixed_caption
    else:
        from difftune.config import DataConfig

        data = DataConfig(path=args.source, resolution=args.resolution, split=args.split,
                          image_column=args.image_column, caption_column=args.caption_column,
                          conditioning_image_column=args.conditioning_image_column)
        needs_conditioning, fixed = None, None
    report = check_dataset(data, needs_conditioning, fixed, full=not args.fast)
    out = write_report(report, Path(args.report))
    console.print(escape(report.summary()), highlight=False, soft_wrap=True)
    console.print(f"report: {out}")
    return 0 if report.ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from difftune.demo import run_demo

    output_dir = args.output_dir or ("runs/demo" if args.preset == "controlnet" else f"runs/demo-{args.preset}")
    final = run_demo(output_dir, list(args.set or []), console, args.preset)
    console.print(f"[green]demo done[/green]: {final}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftune",
        description="Train and fine-tune diffusion image models (ControlNet, LoRA, DreamBooth, full) "
        "from a TOML config; generate with and export the results; check datasets.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    for add in (_add_train, _add_generate, _add_export, _add_data, _add_demo):
        add(verbs)
    return parser


def _add_train(verbs: Any) -> None:
    train = verbs.add_parser("train", help="train from a TOML config")
    train.add_argument("config")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    train.add_argument("--resume", help='"latest" or a checkpoint folder')
    train.set_defaults(run=cmd_train)


def _add_generate(verbs: Any) -> None:
    gen = verbs.add_parser("generate", help="generate an image with trained weights")
    gen.add_argument("--base", required=True,
                     help="base pipeline (Hub id or folder), or a full fine-tune's run directory")
    gen.add_argument("--controlnet", help="ControlNet folder, run directory or Hub id (needs --image)")
    gen.add_argument("--image", help="conditioning image for --controlnet")
    gen.add_argument("--lora", help="LoRA run directory, folder or .safetensors file")
    gen.add_argument("--lora-scale", type=float, default=1.0)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance-scale", type=float, default=7.5)
    gen.add_argument("--conditioning-scale", type=float, default=1.0)
    gen.add_argument("--resolution", type=int,
                     help="square output size (the conditioning image is resized to it)")
    gen.add_argument("--out", required=True)
    gen.set_defaults(run=cmd_generate)


def _add_export(verbs: Any) -> None:
    export = verbs.add_parser("export", help="convert trained weights").add_subparsers(
        dest="export_verb", required=True)
    lora = export.add_parser("lora", help="a LoRA in another key format")
    lora.add_argument("source", help="LoRA run directory, its final/, or a .safetensors file")
    lora.add_argument("out", help="output .safetensors file")
    lora.add_argument("--format", choices=["kohya", "diffusers"], default="kohya",
                      help="kohya: sd-scripts / AUTOMATIC1111 / ComfyUI keys")
    lora.set_defaults(run=cmd_export_lora)
    single = export.add_parser("single-file", help="an SD1.x/2.x pipeline as one original-layout checkpoint")
    single.add_argument("pipeline", help="diffusers pipeline folder, or a full fine-tune's run directory")
    single.add_argument("out", help="output .safetensors file")
    single.add_argument("--half", action="store_true", help="store fp16 weights")
    single.set_defaults(run=cmd_export_single_file)


def _add_data(verbs: Any) -> None:
    data = verbs.add_parser("data", help="dataset tools").add_subparsers(dest="data_verb", required=True)
    circles = data.add_parser("fill-circles", help="write a fill50k-style synthetic dataset")
    circles.add_argument("out")
    circles.add_argument("--n", type=int, default=1000)
    circles.add_argument("--resolution", type=int, default=64)
    circles.add_argument("--seed", type=int, default=0)
    circles.add_argument("--palette", choices=["pil", "demo"], default="pil",
                         help="colour names: all of PIL's, or the demo base's eight")
    circles.add_argument("--parquet", action="store_true", help="one parquet file instead of PNGs + metadata.jsonl")
    circles.set_defaults(run=cmd_fill_circles)

    check = data.add_parser("check", help="scan a dataset for files and captions training cannot use")
    check.add_argument("source", help="a run config (.toml: its [data] and method) or a dataset path / Hub name")
    check.add_argument("--fast", action="store_true", help="headers only, as before every training run")
    check.add_argument("--report", default="data-check.json", help="where the JSON report goes")
    check.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    check.add_argument("--resolution", type=int, default=512, help="for a dataset path: the training size")
    check.add_argument("--split", default="train")
    check.add_argument("--image-column", default="image")
    check.add_argument("--caption-column", default="text")
    check.add_argument("--conditioning-image-column", default="conditioning_image")
    check.set_defaults(run=cmd_data_check)


def _add_demo(verbs: Any) -> None:
    demo = verbs.add_parser("demo", help="train on the tiny fill-circles base (CPU, no downloads)")
    demo.add_argument("preset", nargs="?", choices=["controlnet", "dreambooth"], default="controlnet",
                      help="controlnet: a fill-circles ControlNet; dreambooth: DreamBooth-LoRA teaches a new shape")
    demo.add_argument("--output-dir", help="run directory (default runs/demo, or runs/demo-dreambooth)")
    demo.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    demo.set_defaults(run=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 `data check` found bad rows, 2 a problem the message names
    (config, data, paths, arguments, versions), 130 interrupted by a second Ctrl+C."""
    args = build_parser().parse_args(argv)
    quiet_unrelated_warnings()
    try:
        warn_about_broken_versions()
        return args.run(args)
    except UserError as error:
        console.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; nothing more was written (a run resumes from its last checkpoint)")
        return 130


def warn_about_broken_versions() -> None:
    """One sentence per known-broken pair of installed packages (a run that uses the
    broken feature is refused before models load: training.setup.preflight)."""
    from difftune.versions import broken_pairs

    for _, sentence in broken_pairs():
        console.print(f"[yellow]warning:[/yellow] {escape(sentence)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
