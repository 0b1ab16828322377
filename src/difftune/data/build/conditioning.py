"""`difftune data condition IN OUT --kind KIND`: a conditioning image for every image of
a prepared dataset (an imagefolder with metadata.jsonl), written to a new dataset in OUT
(the images hard-linked, or copied where links cannot be made), with a manifest of the
parameters in OUT/.difftune/condition-manifest.json.

Kinds:
  canny         cv2.Canny(rgb, low, high) on the image as training reads it (8-bit RGB,
                EXIF orientation applied), saved as a one-channel PNG: the edge map
                itself, 0 or 255. --jitter J draws each image's thresholds uniformly
                within J of low and high (seeded by --seed and the file name; every
                image's pair is in the manifest), an augmentation.
  depth         a transformers depth-estimation model (DPT, Depth Anything, ...) given
                by --model (folder or Hub id), its depth map as a grey PNG.
  segmentation  a transformers semantic-segmentation model (SegFormer, UperNet, ...),
                its class map drawn in a fixed palette (class k, the colour of
                `palette_colour(k)`, the PASCAL VOC colour map).
  pose          a transformers pose-estimation model (ViTPose), run on the whole image as
                one person's box; keypoints above --min-score and the limbs between them
                drawn on black (the COCO skeleton for 17-keypoint models).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from difftune.data.build.confine import check_link_inside, clean_name, inside_name, outside_problem
from difftune.data.build.inputs import metadata_file, table_rows
from difftune.data.build.jobs import (
    BOOKKEEPING,
    METADATA,
    Journal,
    Progress,
    bookkeeping,
    map_on_cores,
    write_json,
    write_metadata,
)
from difftune.data.build.limits import check_condition
from difftune.data.build.output import Output, claim_output
from difftune.data.build.writers import CONDITIONING, IMAGES, link_or_copy, remove_unlisted
from difftune.data.sources import open_image, regular_file_problem
from difftune.errors import DataError, InputError

KINDS = ("canny", "depth", "segmentation", "pose")
MODEL_KINDS = {
    "depth": "a depth-estimation model (e.g. Intel/dpt-hybrid-midas, depth-anything/Depth-Anything-V2-Small-hf)",
    "segmentation": "a semantic-segmentation model (e.g. nvidia/segformer-b0-finetuned-ade-512-512, "
                    "openmmlab/upernet-convnext-small)",
    "pose": "a pose-estimation model (e.g. usyd-community/vitpose-base-simple)",
}
MANIFEST = "condition-manifest.json"


@dataclass(frozen=True)
class ConditionSettings:
    kind: str = "canny"
    low: int = 100
    high: int = 200
    jitter: int = 0
    seed: int = 0
    model: str | None = None
    batch_size: int = 8
    min_score: float = 0.3


def read_dataset(source: Path, verb: str) -> list[dict[str, Any]]:
    """The rows of a prepared dataset (what `difftune data prepare` writes), each
    file_name cleaned ("./a.png" -> "a.png"). A row whose file is missing, or points
    outside IN (absolute, "..", a link out), stops the verb before anything is read or
    written, as a missing file always has: the message names the row."""
    metadata = metadata_file(source, (METADATA,)) if source.is_dir() else None
    if metadata is None:
        raise InputError(f"IN = {str(source)!r} has no {METADATA}: `difftune data {verb}` works on a dataset that "
                         "`difftune data prepare` wrote (run it first)")
    check_link_inside(source, source / BOOKKEEPING, "IN")  # caption writes its journal and backup there
    rows = table_rows(metadata)
    for number, row in enumerate(rows, start=1):
        row["file_name"] = _image_name(source, row.get("file_name"), f"{metadata}, row {number}: file_name")
    return rows


def _image_name(source: Path, name: Any, where: str) -> str:
    """A row's file_name, cleaned: a file inside IN, and not difftune's own (condition
    writes the image at the same name in OUT, beside OUT's metadata and bookkeeping)."""
    outside = outside_problem(source, name, where, "IN")  # a name no file can have: a DataError there
    if outside:
        raise DataError(outside)
    problem = regular_file_problem(source / name)
    if problem:
        raise DataError(f"{where} {name!r} is not a file in {source}: {problem}")
    clean = str(clean_name(name))
    if clean == METADATA or clean.split("/")[0] == BOOKKEEPING:
        raise DataError(f"{where} {name!r} names difftune's own file, not an image")
    return clean


def conditioning_targets(rows: list[dict[str, Any]], metadata: Path) -> list[str]:
    """Each row's conditioning_name; two different images that would share one (a.jpg and
    a.png), or an image named as another's conditioning image, are refused: one file
    would be written over the other."""
    targets = [conditioning_name(row["file_name"]) for row in rows]
    images = {row["file_name"]: number for number, row in enumerate(rows, start=1)}
    for number, target in enumerate(targets, start=1):
        if target in images:
            raise DataError(f"{metadata}, rows {images[target]} and {number}: the image {target!r} is where row "
                            f"{number}'s conditioning image would be written; move it out of {CONDITIONING}/")
    first: dict[str, int] = {}
    for number, target in enumerate(targets, start=1):
        earlier = first.setdefault(target, number)
        if rows[earlier - 1]["file_name"] != rows[number - 1]["file_name"]:
            raise DataError(f"{metadata}, rows {earlier} and {number}: {rows[earlier - 1]['file_name']!r} and "
                            f"{rows[number - 1]['file_name']!r} would both have the conditioning image {target}; "
                            "rename one of them")
    return targets


def condition(source: Path, out: Path, settings: ConditionSettings, workers: int | None = None) -> dict[str, Any]:
    """Returns the manifest (also written to OUT/.difftune/condition-manifest.json). A run
    into an OUT made with other settings builds the new dataset beside it and swaps it in
    whole (output.py): OUT never holds conditioning images of two settings."""
    _check_settings(settings)
    check_condition(settings, workers)
    rows = read_dataset(source, "condition")
    targets = conditioning_targets(rows, source / METADATA)
    if settings.kind in MODEL_KINDS:
        check_model_path(str(settings.model))  # before OUT is made: a refusal leaves nothing behind
    identity = {"input": str(source.resolve()), **{k: v for k, v in asdict(settings).items() if k != "batch_size"}}
    output = claim_output("OUT", out, "condition", {"IN": source}, identity)
    journal = Journal(bookkeeping(output.folder) / "condition-journal.jsonl", identity)
    try:
        _draw_all(source, output.folder, rows, targets, settings, journal, workers)
    finally:
        journal.close()
    for row in rows:
        link_or_copy(source / row["file_name"], output.folder / row["file_name"])
    new_rows = [{**{k: v for k, v in row.items() if k not in ("conditioning_image", "conditioning_image_file_name")},
                 "conditioning_image_file_name": target} for row, target in zip(rows, targets)]
    write_metadata(output.folder, new_rows)
    remove_unlisted(output.folder, {row["file_name"] for row in rows} | set(targets))
    manifest = _write_manifest(source, output, settings, journal, targets)
    output.finish()
    return manifest


def _draw_all(source: Path, folder: Path, rows: list[dict[str, Any]], targets: list[str],
              settings: ConditionSettings, journal: Journal, workers: int | None) -> None:
    """Every conditioning image the journal does not hold for the image as it is now
    (a resumed run redraws one whose image changed since)."""
    stamps = [_stamp(source / row["file_name"]) for row in rows]
    todo = [i for i, name in enumerate(targets)
            if journal.done.get(name, {}).get("source") != stamps[i] or not (folder / name).is_file()]
    progress = Progress(f"condition ({settings.kind})", len(rows), already=len(rows) - len(todo))
    if settings.kind == "canny":
        tasks = [(source / rows[i]["file_name"], folder / targets[i], *thresholds(settings, rows[i]["file_name"]))
                 for i in todo]
        for i, result in zip(todo, map_on_cores(canny_file, tasks, workers)):
            journal.record(targets[i], {"source": stamps[i], **result})
            progress.advance()
        return
    draw = ModelConditioner(settings) if todo else None
    for start in range(0, len(todo), settings.batch_size):
        batch = todo[start:start + settings.batch_size]
        for i, image in zip(batch, draw([source / rows[i]["file_name"] for i in batch])):
            _save(image, folder / targets[i])
            journal.record(targets[i], {"source": stamps[i]})
        progress.advance(len(batch))


def _stamp(path: Path) -> str:
    status = path.stat()
    return f"{status.st_size}:{status.st_mtime_ns}"


def _check_settings(settings: ConditionSettings) -> None:
    if settings.kind not in KINDS:
        raise InputError(f"--kind {settings.kind!r}: one of {', '.join(KINDS)}")
    if settings.kind in MODEL_KINDS and not settings.model:
        raise InputError(f"--kind {settings.kind} needs --model: {MODEL_KINDS[settings.kind]}, as a folder or a "
                         "Hub id")
    if settings.kind == "canny" and not 0 <= settings.low <= settings.high:
        raise InputError(f"--low {settings.low} and --high {settings.high}: need 0 <= low <= high")


def conditioning_name(file_name: str) -> str:
    """images/a/b.jpg -> conditioning_images/a/b.png (PNG: an edge or class map must not
    go through JPEG's losses)."""
    name = inside_name(file_name, "OUT")
    name = inside_name(name[len(IMAGES) + 1:] if name.startswith(f"{IMAGES}/") else name, f"OUT/{CONDITIONING}")
    return (Path(CONDITIONING) / name).with_suffix(".png").as_posix()


def thresholds(settings: ConditionSettings, name: str) -> tuple[int, int]:
    """This image's (low, high): the settings', or with jitter a draw seeded by the seed
    and the file name (the same on a resumed run, whatever order the images come in)."""
    if not settings.jitter:
        return settings.low, settings.high
    seed = int.from_bytes(hashlib.sha256(f"{settings.seed}:{name}".encode()).digest()[:8], "big")
    rng = random.Random(seed)
    low = max(0, settings.low + rng.randint(-settings.jitter, settings.jitter))
    high = max(low, settings.high + rng.randint(-settings.jitter, settings.jitter))
    return low, high


def canny_file(task: tuple[Path, Path, int, int]) -> dict[str, int]:
    """One image's edge map (a worker process runs this)."""
    import cv2

    source, target, low, high = task
    rgb = np.asarray(read_rgb(source))
    _save(Image.fromarray(cv2.Canny(rgb, low, high), mode="L"), target)
    return {"low": low, "high": high}


def read_rgb(path: Path) -> Image.Image:
    """The image as training reads it; an unreadable one is a DataError naming the file."""
    return open_image(path.name, path.parent, str(path))


def _save(image: Image.Image, target: Path) -> None:
    """Whole or absent: written under a hidden name, then renamed."""
    import os

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    image.save(staging, format="PNG")
    os.replace(staging, target)


def _write_manifest(source: Path, output: Output, settings: ConditionSettings, journal: Journal,
                    targets: list[str]) -> dict[str, Any]:
    manifest: dict[str, Any] = {"verb": "condition", "input": str(source), "output": str(output.final),
                                "kind": settings.kind, "images": len(targets)}
    if settings.kind == "canny":
        manifest.update(low=settings.low, high=settings.high, jitter=settings.jitter, seed=settings.seed,
                        call="cv2.Canny(np.asarray(rgb), low, high), rgb = the image as 8-bit RGB with its EXIF "
                             "orientation applied; saved as a one-channel PNG")
        if settings.jitter:
            manifest["thresholds"] = {t: [journal.done[t]["low"], journal.done[t]["high"]] for t in targets}
    else:
        manifest.update(model=settings.model, batch_size=settings.batch_size)
        if settings.kind == "pose":
            manifest["min_score"] = settings.min_score
    write_json(bookkeeping(output.folder) / MANIFEST, manifest)
    return manifest


def palette_colour(label: int) -> tuple[int, int, int]:
    """The PASCAL VOC colour map: the label's bits spread over the high bits of R, G, B,
    so neighbouring labels get distant colours."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= ((label >> 0) & 1) << shift
        g |= ((label >> 1) & 1) << shift
        b |= ((label >> 2) & 1) << shift
        label >>= 3
    return r, g, b


# COCO's 17 keypoints: the limbs between them (0-based), as COCO's person skeleton.
COCO_LIMBS = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
              (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))


class ModelConditioner:
    """A transformers model that turns a batch of images into conditioning images, on
    the GPU when there is one."""

    def __init__(self, settings: ConditionSettings) -> None:
        import torch

        self.settings = settings
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.processor, self.model = load_model(settings.kind, settings.model or "")
        self.model.to(self.device).eval()

    def __call__(self, files: list[Path]) -> list[Image.Image]:
        import torch

        images = [read_rgb(f) for f in files]
        with torch.inference_mode():
            return getattr(self, f"_{self.settings.kind}")(images)

    def _inputs(self, images: list[Image.Image], **extra: Any) -> Any:
        return self.processor(images=images, return_tensors="pt", **extra).to(self.device)

    def _depth(self, images: list[Image.Image]) -> list[Image.Image]:
        outputs = self.model(**self._inputs(images))
        sizes = [(image.height, image.width) for image in images]
        depths = self.processor.post_process_depth_estimation(outputs, target_sizes=sizes)
        maps = []
        for depth in depths:
            values = depth["predicted_depth"].float().cpu().numpy()
            span = float(values.max() - values.min())
            scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
            maps.append(Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L"))
        return maps

    def _segmentation(self, images: list[Image.Image]) -> list[Image.Image]:
        outputs = self.model(**self._inputs(images))
        sizes = [(image.height, image.width) for image in images]
        labels = self.processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        colours = np.array([palette_colour(k) for k in range(256)], dtype=np.uint8)
        return [Image.fromarray(colours[label.cpu().numpy() % 256], mode="RGB") for label in labels]

    def _pose(self, images: list[Image.Image]) -> list[Image.Image]:
        boxes = [[[0.0, 0.0, float(image.width), float(image.height)]] for image in images]  # COCO x, y, w, h
        outputs = self.model(**self._inputs(images, boxes=boxes))
        people = self.processor.post_process_pose_estimation(outputs, boxes=boxes, threshold=self.settings.min_score)
        drawn = []
        for image, found in zip(images, people):
            canvas = Image.new("RGB", image.size)
            pen = ImageDraw.Draw(canvas)
            radius = max(1, round(min(image.size) / 100))
            for person in found:  # the keypoints scored at least min_score, by keypoint number
                points = {int(k): tuple(map(float, xy)) for k, xy in
                          zip(person["labels"].cpu().numpy(), person["keypoints"].cpu().numpy())}
                if self.model.config.num_labels == 17:
                    for a, b in COCO_LIMBS:
                        if a in points and b in points:
                            pen.line([points[a], points[b]], fill=palette_colour(a + 1), width=radius)
                for k, (x, y) in points.items():
                    pen.ellipse([x - radius, y - radius, x + radius, y + radius], fill=palette_colour(k + 1))
            drawn.append(canvas)
        return drawn


def load_model(kind: str, name: str) -> tuple[Any, Any]:
    """The processor and model, through transformers' own loading; a failure names the
    model and what to do."""
    import transformers

    classes = {"depth": transformers.AutoModelForDepthEstimation,
               "segmentation": transformers.AutoModelForSemanticSegmentation,
               "pose": transformers.AutoModelForPoseEstimation}
    check_model_path(name)
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name)
        model = classes[kind].from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"--model {name!r} could not be loaded as {MODEL_KINDS[kind]}: {str(error).splitlines()[0]}. "
                         "Give a folder with its config.json, weights and preprocessor_config.json, or a Hub id "
                         "(downloaded once, when online)") from None
    return processor, model


def check_model_path(name: str) -> None:
    """A --model that is meant as a folder (it looks like a path, or is a folder) must be
    one with a config.json (every transformers model has one). Called before the verb
    writes anything: a model that cannot be found must not leave a half-made OUT."""
    from difftune.paths import looks_like_path

    folder = Path(name).expanduser()
    if looks_like_path(name) and not folder.is_dir():
        raise InputError(f"--model {name!r}: no such folder (give the folder that holds the model's config.json, "
                         "or a Hub id such as owner/name)")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise InputError(f"--model {name!r}: the folder has no config.json (give the folder that holds the "
                         "model's config.json, weights and processor files, or a Hub id such as owner/name)")
