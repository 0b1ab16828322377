"""`difftune data prepare|condition|caption`: flags -> the build functions. Nothing heavy
is imported until a verb runs (`difftune --help` stays fast)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_prepare(args: argparse.Namespace) -> int:
    from difftune.data.build.filters import FilterSettings
    from difftune.data.build.prepare import prepare

    settings = FilterSettings(min_size=args.min_size, max_aspect=args.max_aspect,
                              min_bytes_per_megapixel=args.min_bytes_per_megapixel, min_sharpness=args.min_sharpness,
                              dedup=not args.no_dedup, phash_distance=args.phash_distance)
    prepare(Path(args.input), Path(args.output), settings, args.format, _path(args.conditioning), _path(args.captions),
            args.caption_column, args.workers, args.shard_size, args.push_to_hub)
    return 0


def cmd_condition(args: argparse.Namespace) -> int:
    from difftune.data.build.conditioning import ConditionSettings, condition

    settings = ConditionSettings(kind=args.kind, low=args.low, high=args.high, jitter=args.jitter, seed=args.seed,
                                 model=args.model, batch_size=args.batch_size, min_score=args.min_score)
    manifest = condition(Path(args.input), Path(args.output), settings, args.workers)
    print(f"condition: {manifest['images']} {args.kind} image(s) in {args.output}; manifest: "
          f"{Path(args.output) / '.difftune' / 'condition-manifest.json'}")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from difftune.data.build.captioning import CaptionSettings, caption

    settings = CaptionSettings(model=args.model, prompt=args.prompt, prefix=args.prefix, suffix=args.suffix,
                               overwrite=args.overwrite, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, column=args.caption_column)
    summary = caption(Path(args.input), settings)
    print(f"caption: {summary['captioned']} image(s) captioned, {summary['kept']} kept their caption; "
          f"{Path(args.input) / 'metadata.jsonl'} updated")
    return 0


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def add_build_verbs(data: Any) -> None:
    for add in (_add_prepare, _add_condition, _add_caption):
        add(data)


def _add_prepare(data: Any) -> None:
    prepare = data.add_parser(
        "prepare", help="filter a folder of images into a dataset (imagefolder, hf or webdataset) with a report",
        description="Read IN (images, with NAME.txt captions or a metadata.jsonl/csv), drop unreadable, too small, "
                    "extreme-aspect, over-compressed, blurry and duplicate images, and write the rest to OUT. "
                    "The report (OUT/.difftune/prepare-report.json) names every dropped file and why (a file "
                    "named outside IN is dropped unread). A stopped run resumes: give the same command again; "
                    "other settings into the same OUT replace its dataset whole once the new one is complete.")
    prepare.add_argument("input", metavar="IN")
    prepare.add_argument("output", metavar="OUT", help="a new or empty folder, or one `prepare` wrote")
    prepare.add_argument("--format", choices=["imagefolder", "hf", "webdataset"], default="imagefolder")
    prepare.add_argument("--conditioning", help="a folder of conditioning images named as the images")
    prepare.add_argument("--captions", help="a .jsonl or .csv of file_name and caption")
    prepare.add_argument("--caption-column", default="text")
    prepare.add_argument("--min-size", type=int, default=32, help="drop images whose short side is smaller")
    prepare.add_argument("--max-aspect", type=float, default=4.0, help="drop images longer than this to one")
    prepare.add_argument("--min-bytes-per-megapixel", type=float, default=0.0,
                         help="drop JPEG/WebP files smaller than this per megapixel (0: off; ~20000 drops heavy "
                              "compression)")
    prepare.add_argument("--min-sharpness", type=float, default=0.0,
                         help="drop images whose Laplacian variance is lower (0: off; ~100 for photos)")
    prepare.add_argument("--no-dedup", action="store_true", help="keep duplicates")
    prepare.add_argument("--phash-distance", type=int, default=4,
                         help="near duplicates: perceptual hashes this many bits apart or fewer (-1: off)")
    prepare.add_argument("--workers", type=int, help="processes (default: every core)")
    prepare.add_argument("--shard-size", type=int, default=1000, help="webdataset: samples per .tar")
    prepare.add_argument("--push-to-hub", metavar="REPO", help="hf: also push the dataset to this Hub repository")
    prepare.set_defaults(run=cmd_prepare)


def _add_condition(data: Any) -> None:
    condition = data.add_parser(
        "condition", help="make a conditioning image for every image of a prepared dataset",
        description="Write a new dataset in OUT: IN's images (hard-linked) and rows, each with a conditioning "
                    "image of the chosen kind, and the parameters in OUT/.difftune/condition-manifest.json.")
    condition.add_argument("input", metavar="IN", help="a dataset `difftune data prepare` wrote")
    condition.add_argument("output", metavar="OUT", help="a new or empty folder, or one `condition` wrote")
    condition.add_argument("--kind", choices=["canny", "depth", "segmentation", "pose"], required=True)
    condition.add_argument("--low", "--low-threshold", dest="low", type=int, default=100, help="canny: the low threshold")
    condition.add_argument("--high", "--high-threshold", dest="high", type=int, default=200, help="canny: the high threshold")
    condition.add_argument("--jitter", type=int, default=0,
                           help="canny: draw each image's thresholds within this of low and high (augmentation)")
    condition.add_argument("--seed", type=int, default=0, help="canny: the seed of the jittered thresholds")
    condition.add_argument("--model", help="depth, segmentation, pose: a transformers model folder or Hub id")
    condition.add_argument("--batch-size", type=int, default=8, help="model kinds: images per forward pass")
    condition.add_argument("--min-score", type=float, default=0.3, help="pose: keypoints scored lower are not drawn")
    condition.add_argument("--workers", type=int, help="canny: processes (default: every core)")
    condition.set_defaults(run=cmd_condition)


def _add_caption(data: Any) -> None:
    caption = data.add_parser(
        "caption", help="caption a prepared dataset's images with an image-to-text model",
        description="Write a caption for every image of IN (a dataset `difftune data prepare` wrote) into its "
                    "metadata.jsonl; the previous one is kept in IN/.difftune/. Images are not touched.")
    caption.add_argument("input", metavar="IN")
    caption.add_argument("--model", required=True,
                         help="a transformers image-to-text model folder or Hub id (BLIP, BLIP-2, Florence-2, ...)")
    caption.add_argument("--prompt", help='text for the model to continue ("a photography of") or a task ("<CAPTION>")')
    caption.add_argument("--prefix", default="", help="put before every new caption")
    caption.add_argument("--suffix", default="", help="put after every new caption")
    caption.add_argument("--overwrite", action="store_true", help="replace existing captions too")
    caption.add_argument("--batch-size", type=int, default=8)
    caption.add_argument("--max-new-tokens", type=int, default=40)
    caption.add_argument("--caption-column", default="text")
    caption.set_defaults(run=cmd_caption)
