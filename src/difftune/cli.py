"""The `difftune` command: verbs mapped to API calls, no training logic here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from difftune.errors import InputError, UserError
from difftune.quiet import quiet_unrelated_warnings

console = Console(stderr=True, log_path=False)

def cmd_train(args: argparse.Namespace) -> int:
    from difftune.config import load_config

    values = {"train.resume": args.resume} if args.resume else {}
    config = load_config(args.config, list(args.set or []), values)  # before torch is imported
    return run_training(config)


def run_training(config: Any) -> int:
    """Plan the run (paths, lock, checkpoint, resume contract: no torch yet), then train
    it and say how it ended. Exit 0 when final/ is written (or was already), 130 when
    Ctrl+C stopped it after a checkpoint; a SIGTERM stop (a scheduler's) exits 0."""
    from difftune.signals import StopSignals
    from difftune.training.plan import main_process_by_environment, plan_run

    with StopSignals() as stop:  # from the start: a signal while libraries and models load is a request too
        main_process = main_process_by_environment()
        return _train_planned(plan_run(config, main_process), stop, main_process)


def _train_planned(plan: Any, stop: Any, main_process: bool) -> int:
    if plan.finished_at is not None:
        from difftune.training.plan import finished_message

        if main_process:
            console.print(finished_message(plan), highlight=False, soft_wrap=True)
        return 0
    from difftune.training.loop import Run

    run = Run(plan.config, console, plan, stop)
    final = run.fit()
    if not main_process:
        return 0
    if final is None:
        console.print(f"stopped early; run the same command again to continue from {plan.run_dir}")
        return 130 if stop.signal_name == "SIGINT" else 0
    console.print(f"[green]done[/green]: {final}")
    if plan.config.hub.push:
        from difftune.export.hub import push_to_hub

        repo = push_to_hub(plan.run_dir, plan.config)
        console.print(f"pushed to https://huggingface.co/{repo}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from difftune.generation_plan import Generation, plan_generation

    given = {name for name in GENERATE_SETTINGS if getattr(args, name) is not None}
    settings = {name: getattr(args, name) for name in given}
    home = {name: os.path.expanduser(value) if value else value  # a quoted '~/x' reaches us as it is
            for name, value in {"base": args.base or "", "controlnet": args.controlnet, "image": args.image,
                                "lora": args.lora, "embedding": args.embedding, "out": args.out}.items()}
    request = Generation(prompt=args.prompt, negative_prompt=args.negative_prompt, family=args.family,
                         quantize=args.quantize, **{**home, "out": Path(home["out"])}, **settings)
    request = plan_generation(request, given, args.overwrite)  # every argument checked before torch is imported
    for note in request.notes:
        console.print(f"using {note}", highlight=False)
    from difftune.generate import generate
    from difftune.signals import StopSignals

    with StopSignals() as stop:  # a first Ctrl+C stops after loading or between steps
        out = generate(request, lambda: stop.requested)
    console.print(f"wrote {out}")
    return 0


GENERATE_SETTINGS = ("lora_scale", "steps", "seed", "guidance_scale", "conditioning_scale", "resolution", "scheduler")


def cmd_fill_circles(args: argparse.Namespace) -> int:
    from difftune.paths import check_output_dir

    if not 1 <= args.n <= 10_000_000:
        raise InputError(f"--n must be between 1 and 10,000,000 (got {args.n})")
    if not 8 <= args.resolution <= 8192:
        raise InputError(f"--resolution must be between 8 and 8192 (got {args.resolution})")
    out = check_output_dir("out", args.out)
    if out.is_dir() and any(out.iterdir()):
        raise InputError(f"out = {args.out!r} is not empty: the samples would be mixed with (and overwrite) "
                         "what is there. Give a new or empty folder.")
    from difftune.data.synthetic import (
        DEMO_PALETTE,
        RAW_BAD_FILES,
        write_fill_circles,
        write_fill_circles_parquet,
        write_raw_circles,
    )

    palette = DEMO_PALETTE if args.palette == "demo" else None
    if args.raw:
        if args.parquet or args.n < 4:
            raise InputError("--raw writes image files (not --parquet), at least 4 (--n)")
        out = write_raw_circles(args.out, args.n, args.resolution, args.seed, palette)
        console.print(f"wrote {args.n} raw images with captions to {out}, and {len(RAW_BAD_FILES)} bad files "
                      f"({', '.join(RAW_BAD_FILES)}) for `difftune data prepare` to drop")
        return 0
    writer = write_fill_circles_parquet if args.parquet else write_fill_circles
    out = writer(args.out, args.n, args.resolution, args.seed, palette)
    console.print(f"wrote {args.n} fill-circles samples to {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    """Exit 0 when every row can be trained on, 1 when some cannot, 2 on a usage error."""
    from difftune.paths import (
        check_not_an_input,
        check_output_file,
        looks_like_path,
        offline_if_hub_unreachable,
    )

    check_output_file("--report", args.report, (".json",), overwrite=is_data_check_report(Path(args.report)))
    check_not_an_input("--report", args.report, {"the dataset": args.source})
    source = Path(args.source)
    if not source.exists() and not looks_like_path(args.source):
        note = offline_if_hub_unreachable()  # a Hub dataset: fail fast, or read the cache
        if note:
            console.print(f"note: {note}", highlight=False)
    if source.is_file() and source.suffix != ".toml":
        raise InputError(f"source = {args.source!r} is a file: give a dataset folder, a Hub dataset name, or a "
                         "run config (.toml)")
    if source.suffix == ".toml" and source.is_file():
        flags = [f"--{name.replace('_', '-')}" for name in DATA_FLAGS if getattr(args, name) != DATA_FLAGS[name]]
        if flags:
            raise InputError(f"{', '.join(flags)}: only for a dataset path; with a run config, use "
                             "--set data.KEY=VALUE")
        from difftune.config import load_config

        run = load_config(source, list(args.set or []))
        data, needs_conditioning, fixed = run.data, run.method.needs_conditioning, run.method.fixed_caption
        references = run.method.takes_references
    else:
        from difftune.config import DataConfig, build_section

        if args.set:
            raise InputError("--set needs a run config (.toml) as the source")
        flags = {"path": args.source, "resolution": args.resolution, "split": args.split,
                 "image_column": args.image_column, "caption_column": args.caption_column,
                 "conditioning_image_column": args.conditioning_image_column}
        data = build_section(DataConfig, flags, "the data check's flags")
        needs_conditioning, fixed, references = None, None, False
    from difftune.data.check import check_dataset, write_report

    report = check_dataset(data, needs_conditioning, fixed, full=not args.fast, references=references)
    out = write_report(report, Path(args.report))
    console.print(escape(report.summary()), highlight=False, soft_wrap=True)
    console.print(f"report: {out}")
    return 0 if report.ok else 1


def is_data_check_report(path: Path) -> bool:
    """An earlier `data check` report, which a new check may replace (nothing else is)."""
    try:
        return {"findings", "bad_rows"} <= set(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return False


DATA_FLAGS = {"resolution": 512, "split": "train", "image_column": "image", "caption_column": "text",
              "conditioning_image_column": "conditioning_image"}
"""data check's flags for a dataset path, with their defaults."""


def cmd_demo(args: argparse.Namespace) -> int:
    from difftune.demo import demo_config, in_repository_root

    default = "runs/demo" if args.preset == "controlnet" else f"runs/demo-{args.preset}"
    output_dir = args.output_dir if args.output_dir is not None else default
    config = demo_config(output_dir, list(args.set or []), args.preset)
    with in_repository_root():
        return run_training(config)


def cmd_presets(args: argparse.Namespace) -> int:
    from difftune.presets import all_presets

    presets = all_presets()
    width = max(len(preset.name) for preset in presets)
    for preset in presets:
        print(f"{preset.name:<{width}}  {preset.summary}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from difftune.presets import write_preset

    out = Path(args.out) if args.out else Path(args.preset.removesuffix(".toml").replace("/", "-") + ".toml")
    write_preset(args.preset, out)
    console.print(f"wrote {out} (the preset {args.preset}, with its comments). Set [model] pretrained, [data] path "
                  f"and [train] output_dir, then: difftune train {out}", highlight=False, soft_wrap=True)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    from difftune.watch import serve

    return serve(args.runs, args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difftune",
        description="Train and fine-tune diffusion image models (ControlNet, LoRA, DreamBooth, full) "
        "from a TOML config; generate with and export the results; check datasets.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    from difftune.data.cache_folder import add_cache_verb
    from difftune.export.verbs import add_export_verbs

    for add in (_add_train, _add_generate, add_export_verbs, _add_data, add_cache_verb, _add_demo, _add_presets,
                _add_watch):
        add(verbs)
    return parser


def _add_train(verbs: Any) -> None:
    train = verbs.add_parser("train", help="train from a TOML config")
    train.add_argument("config")
    train.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
    train.add_argument("--resume", help='"latest", a checkpoint of the run by name (step-000100, looked up in '
                       'train.output_dir/checkpoints), or a path to a checkpoint folder')
    train.set_defaults(run=cmd_train)


def _add_generate(verbs: Any) -> None:
    gen = verbs.add_parser("generate", help="generate an image with trained weights")
    gen.add_argument("--base", help="base pipeline (Hub id or folder), or a full fine-tune's run directory; "
                     "may be left out when --controlnet or --lora is a run directory (it records its base)")
    gen.add_argument("--controlnet", help="ControlNet folder, run directory or Hub id (needs --image)")
    gen.add_argument("--image", help="conditioning image for --controlnet")
    gen.add_argument("--lora", help="LoRA run directory, folder or .safetensors file (LoRA, DoRA; a LoKr or LoHa "
                     "run directory or its final/)")
    gen.add_argument("--embedding", help="textual-inversion run directory or folder (learned_embeds.safetensors)")
    gen.add_argument("--lora-scale", type=float, help="default 1.0")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int, help="inference steps (default: the run's validation.steps, a "
                     "step-distilled base's own (Turbo 1, LCM 4), or 20)")
    gen.add_argument("--seed", type=int, help="default 0")
    gen.add_argument("--guidance-scale", type=float, help="default: the run's validation.guidance_scale, a "
                     "step-distilled base's own (Turbo 0, LCM 1), or 7.5")
    gen.add_argument("--scheduler", help="diffusers scheduler class to sample with (default: the run's "
                     "validation.scheduler, a step-distilled base's own, or the family's sampler)")
    gen.add_argument("--conditioning-scale", type=float, help="default 1.0")
    gen.add_argument("--resolution", type=int,
                     help="square output size, the conditioning image resized to it (default: the run's "
                     "data.resolution, or the base's native size)")
    gen.add_argument("--family", help="the base's family (sd, sdxl, ...); default: the run's, or what the "
                     "base's model_index.json says")
    gen.add_argument("--quantize", choices=["nf4", "int8", "fp8"],
                     help="hold the base's denoiser and text encoders in 4 or 8 bits (bitsandbytes; fp8: torchao)")
    gen.add_argument("--out", required=True, help="the image file to write (.png, .jpg, .webp, ...)")
    gen.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    gen.set_defaults(run=cmd_generate)


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
    circles.add_argument("--raw", action="store_true",
                         help="targets only, captions in NAME.txt, with a truncated, a duplicate and a tiny file: "
                              "a folder to start `difftune data prepare` from")
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

    from difftune.data.build.verbs import add_build_verbs

    add_build_verbs(data)


def _add_demo(verbs: Any) -> None:
    demo = verbs.add_parser("demo", help="train on the tiny fill-circles base (CPU, no downloads)")
    demo.add_argument("preset", nargs="?", choices=["controlnet", "dreambooth"], default="controlnet",
                      help="controlnet: a fill-circles ControlNet; dreambooth: DreamBooth-LoRA teaches a new shape")
    demo.add_argument("--output-dir", help="run directory (default runs/demo, or runs/demo-dreambooth)")
    demo.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    demo.set_defaults(run=cmd_demo)


def _add_presets(verbs: Any) -> None:
    presets = verbs.add_parser("presets", help="list the preset configs, one line each")
    presets.set_defaults(run=cmd_presets)
    init = verbs.add_parser("init", help="start a config from a preset (copied with its comments)")
    init.add_argument("preset", help='a preset\'s name, as `difftune presets` lists it ("sdxl/lora")')
    init.add_argument("out", nargs="?", help="the .toml file to write (default: FAMILY-METHOD.toml here)")
    init.set_defaults(run=cmd_init)


def _add_watch(verbs: Any) -> None:
    watch = verbs.add_parser("watch", help="a local, read-only web page of runs while they train: curves, "
                             "validation images, facts",
                             description="Serve a web page that shows runs as they train: the loss (raw and "
                             "smoothed), learning rate, samples/s and metric curves, each validation's images "
                             "with their prompts, and the run's facts (config, ETA, checkpoints, final/). It "
                             "reads only the run directories (also a finished or synced one) and writes nothing.")
    watch.add_argument("runs", nargs="*", metavar="RUN",
                       help="run directories (train.output_dir), compared on one page; default: the current "
                       "folder if it is a run, else the runs in it, else those in ./runs")
    watch.add_argument("--port", type=int, default=7860, help="port to serve on (0: any free one)")
    watch.add_argument("--host", default="127.0.0.1",
                       help="address to bind (127.0.0.1: this machine only; another address lets anyone "
                       "who can reach it read the runs)")
    watch.set_defaults(run=cmd_watch)


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
        resumes = " (the run resumes from its last checkpoint)" if args.verb in ("train", "demo") else ""
        console.print(f"interrupted; nothing more was written{resumes}")
        return 130


def warn_about_broken_versions() -> None:
    """One sentence per known-broken pair of installed packages (a run that uses the
    broken feature is refused before models load: training.setup.preflight)."""
    from difftune.versions import broken_pairs

    for _, sentence in broken_pairs():
        console.print(f"[yellow]warning:[/yellow] {escape(sentence)}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
