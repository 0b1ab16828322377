"""fill-circles: a fill50k-style synthetic ControlNet dataset (Zhang et al. 2023, fill50k).

The conditioning image is a white circle outline on black; the target is the same
circle filled with one colour on a background of another; the caption names both.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw

# Eight well-separated colours, one tokenizer word each: the palette the demo base
# (benchmarks/fill_circles/train_base.py) learned. PIL's ~140 names proved too many for it.
DEMO_PALETTE = ["red", "green", "blue", "yellow", "white", "black", "orange", "purple"]


def pil_colour_names() -> list[str]:
    """PIL's named colours, one name per distinct RGB value (so grey/gray count once)."""
    by_rgb: dict[tuple[int, int, int], str] = {}
    for name in sorted(ImageColor.colormap):
        by_rgb.setdefault(ImageColor.getrgb(name)[:3], name)
    return sorted(by_rgb.values())


@dataclass(frozen=True)
class Circle:
    x: int
    y: int
    radius: int
    foreground: str
    background: str

    @property
    def caption(self) -> str:
        return f"{self.foreground} circle with {self.background} background"

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x - self.radius, self.y - self.radius, self.x + self.radius, self.y + self.radius)


def random_circle(rng: random.Random, resolution: int, colours: list[str]) -> Circle:
    radius = rng.randint(resolution // 8, resolution // 3)
    x = rng.randint(radius, resolution - radius)
    y = rng.randint(radius, resolution - radius)
    foreground, background = rng.sample(colours, 2)
    return Circle(x, y, radius, foreground, background)


def draw_target(circle: Circle, resolution: int) -> Image.Image:
    image = Image.new("RGB", (resolution, resolution), circle.background)
    ImageDraw.Draw(image).ellipse(circle.box, fill=circle.foreground)
    return image


def draw_conditioning(circle: Circle, resolution: int, width: int | None = None) -> Image.Image:
    """The white outline on black; `width` (default resolution / 64) is drawn inwards (a VAE
    of factor 16 trained on discs loses a 2-pixel line: thicker outlines reach its latents)."""
    image = Image.new("RGB", (resolution, resolution), "black")
    width = width or max(1, resolution // 64)
    ImageDraw.Draw(image).ellipse(circle.box, outline="white", width=width)
    return image


def write_fill_circles(
    out_dir: str | Path, count: int, resolution: int, seed: int, colours: list[str] | None = None
) -> Path:
    """Write images/, conditioning_images/ and metadata.jsonl (imagefolder layout)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "conditioning_images").mkdir(exist_ok=True)
    rng = random.Random(seed)
    palette = colours or pil_colour_names()
    rows = []
    for index in range(count):
        circle = random_circle(rng, resolution, palette)
        name = f"{index:06d}.png"
        draw_target(circle, resolution).save(out / "images" / name)
        draw_conditioning(circle, resolution).save(out / "conditioning_images" / name)
        rows.append(
            {
                "file_name": f"images/{name}",
                "conditioning_image": f"conditioning_images/{name}",
                "text": circle.caption,
            }
        )
    with open(out / "metadata.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return out


def write_fill_circles_webdataset(
    out_dir: str | Path, count: int, resolution: int, seed: int, shards: int = 2, colours: list[str] | None = None
) -> Path:
    """The same samples as webdataset .tar shards: per sample KEY.png (target),
    KEY.conditioning.png and KEY.txt (caption), samples dealt to the shards in turn."""
    import contextlib

    from difftune.data.build.writers import TarWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    palette = colours or pil_colour_names()
    with contextlib.ExitStack() as stack:
        archives = [stack.enter_context(TarWriter(out / f"shard-{n:05d}.tar")) for n in range(shards)]
        for index in range(count):
            circle = random_circle(rng, resolution, palette)
            archive, key = archives[index % shards], f"{index:06d}"
            archive.add(f"{key}.png", _png(draw_target(circle, resolution)))
            archive.add(f"{key}.conditioning.png", _png(draw_conditioning(circle, resolution)))
            archive.add(f"{key}.txt", circle.caption.encode())
    return out


def _png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


RAW_BAD_FILES = {"truncated.png": "unreadable", "000003-copy.png": "duplicate", "tiny.png": "too_small"}
"""The files write_raw_circles adds for `difftune data prepare` to drop, and why."""


def write_raw_circles(out_dir: str | Path, count: int, resolution: int, seed: int,
                      colours: list[str] | None = None, bad_files: bool = True) -> Path:
    """A folder as a user starts from: fill-circles targets (no conditioning images),
    each captioned in NNNNNN.txt, every fourth a JPEG; with bad_files, also a truncated
    PNG, a byte-for-byte copy of 000003.png and an 8x8 image (RAW_BAD_FILES)."""
    if bad_files and count < 4:
        raise ValueError("the bad files copy sample 3: write at least 4 samples")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        circle = random_circle(rng, resolution, colours or DEMO_PALETTE)
        suffix = ".jpg" if index % 4 == 1 else ".png"
        draw_target(circle, resolution).save(out / f"{index:06d}{suffix}", quality=95)
        (out / f"{index:06d}.txt").write_text(circle.caption)
    if bad_files:
        whole = _png(draw_target(random_circle(rng, resolution, colours or DEMO_PALETTE), resolution))
        (out / "truncated.png").write_bytes(whole[: len(whole) // 2])
        (out / "000003-copy.png").write_bytes((out / "000003.png").read_bytes())
        (out / "000003-copy.txt").write_text((out / "000003.txt").read_text())
        Image.new("RGB", (8, 8), "red").save(out / "tiny.png")
    return out


def fill_circles_rows(count: int, resolution: int, seed: int, colours: list[str],
                      outline_width: int | None = None) -> dict[str, list]:
    """Columns image, conditioning_image (PIL) and text, drawn in memory."""
    rng = random.Random(seed)
    columns: dict[str, list] = {"image": [], "conditioning_image": [], "text": []}
    for _ in range(count):
        circle = random_circle(rng, resolution, colours)
        columns["image"].append(draw_target(circle, resolution))
        columns["conditioning_image"].append(draw_conditioning(circle, resolution, outline_width))
        columns["text"].append(circle.caption)
    return columns


def write_fill_circles_parquet(
    out_dir: str | Path, count: int, resolution: int, seed: int, colours: list[str] | None = None,
    outline_width: int | None = None,
) -> Path:
    """The same samples as one parquet file with Image columns (a folder load_dataset reads)."""
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = fill_circles_rows(count, resolution, seed, colours or pil_colour_names(), outline_width)
    features = datasets.Features(
        {"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")}
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(out / "data.parquet"))
    return out


def write_subject_folder(
    out_dir: str | Path, count: int, resolution: int, seed: int, word: str = "sks",
    colours: list[str] | None = None,
) -> Path:
    """A DreamBooth instance folder for the demo base: filled squares, a shape the base
    never saw, captioned "{fg} {word} with {bg} background" in NNNNNN.txt beside each PNG."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        shape = random_circle(rng, resolution, colours or DEMO_PALETTE)
        image = Image.new("RGB", (resolution, resolution), shape.background)
        ImageDraw.Draw(image).rectangle(shape.box, fill=shape.foreground)
        image.save(out / f"{index:06d}.png")
        (out / f"{index:06d}.txt").write_text(f"{shape.foreground} {word} with {shape.background} background")
    return out


@dataclass(frozen=True)
class CircleEdit:
    """One fill-circles edit: the reference disc (colour A on background B) and the
    target, the same disc (centre, radius, background) recoloured C."""

    reference: Circle
    target: Circle

    @property
    def instruction(self) -> str:
        return f"make the circle {self.target.foreground}"


def distinct_colours(colours: list[str]) -> list[str]:
    """The palette with each RGB value once (grey/gray would make A == C in pixels)."""
    by_rgb: dict[tuple[int, ...], str] = {}
    for name in colours:
        by_rgb.setdefault(ImageColor.getrgb(name)[:3], name)
    return list(by_rgb.values())


def random_circle_edit(rng: random.Random, resolution: int, colours: list[str]) -> CircleEdit:
    reference = random_circle(rng, resolution, colours)
    recolour = rng.choice([c for c in colours if c not in (reference.foreground, reference.background)])
    return CircleEdit(reference, Circle(reference.x, reference.y, reference.radius, recolour, reference.background))


def _edit_samples(count: int, resolution: int, seed: int, colours: list[str],
                  without_reference: float, references: int) -> tuple[list[CircleEdit], set[int]]:
    """The edits and the indices of the rows left without a reference. The circles are
    drawn first, so a seed gives the same circles whatever the fraction without one."""
    if not 0.0 <= without_reference <= 1.0:
        raise ValueError(f"without_reference = {without_reference}: a fraction in [0, 1]")
    if references not in (1, 2):
        raise ValueError(f"references = {references}: 1 (the disc) or 2 (the disc and a swatch)")
    palette = distinct_colours(colours)
    if len(palette) < 3:
        raise ValueError(f"an edit needs 3 distinct colours (A, B, C); the palette has {palette}")
    rng = random.Random(seed)
    edits = [random_circle_edit(rng, resolution, palette) for _ in range(count)]
    # An exact count, not a coin per row: a small set still gets its share of null rows.
    bare = set(rng.sample(range(count), round(count * without_reference)))
    return edits, bare


def _edit_text(edit: CircleEdit, has_reference: bool) -> str:
    # Without a reference the row trains text-to-image, so its text describes the target.
    return edit.instruction if has_reference else edit.target.caption


def fill_circles_edit_rows(
    count: int, resolution: int, seed: int, colours: list[str] = DEMO_PALETTE,
    without_reference: float = 0.0, references: int = 1,
) -> dict[str, list]:
    """write_fill_circles_edit's rows in memory (the same samples for the same arguments):
    columns image (PIL target), reference_image (PIL, a list of PIL with references=2, or
    None) and text."""
    edits, bare = _edit_samples(count, resolution, seed, colours, without_reference, references)
    columns: dict[str, list] = {"image": [], "reference_image": [], "text": []}
    for index, edit in enumerate(edits):
        images = _edit_references(edit, resolution, references)
        columns["image"].append(draw_target(edit.target, resolution))
        columns["reference_image"].append(None if index in bare else images if references > 1 else images[0])
        columns["text"].append(_edit_text(edit, index not in bare))
    return columns


def _edit_references(edit: CircleEdit, resolution: int, references: int) -> list[Image.Image]:
    images = [draw_target(edit.reference, resolution)]
    if references > 1:
        images.append(Image.new("RGB", (resolution, resolution), edit.target.foreground))
    return images


def write_fill_circles_edit(
    out_dir: str | Path, count: int, resolution: int, seed: int, colours: list[str] = DEMO_PALETTE,
    without_reference: float = 0.0, references: int = 1,
) -> Path:
    """An edit dataset (FLUX.1 Kontext / Qwen-Image-Edit style) as images/, reference_images/
    and metadata.jsonl with columns file_name (the target), reference_image (path relative
    to the folder) and text (the instruction "make the circle C").

    The reference is a disc of colour A on background B, the target the same disc in C on
    B (A, B, C distinct palette colours). A fraction `without_reference` of the rows have
    reference_image null and as text the target's caption "C circle with B background" (they
    train text-to-image). With references=2, reference_image is a list of two paths: the
    disc, then swatch_images/NNNNNN.png, an image filled with C (the colour to paint, shown
    rather than named: it only exercises rows with several references).
    """
    edits, bare = _edit_samples(count, resolution, seed, colours, without_reference, references)
    out = Path(out_dir)
    folders = ["images", "reference_images"] + (["swatch_images"] if references > 1 else [])
    for folder in folders:
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for index, edit in enumerate(edits):
        name = f"{index:06d}.png"
        draw_target(edit.target, resolution).save(out / "images" / name)
        paths = None
        if index not in bare:
            paths = [f"{folder}/{name}" for folder in folders[1:]]
            for path, image in zip(paths, _edit_references(edit, resolution, references)):
                image.save(out / path)
        reference = paths if paths is None or references > 1 else paths[0]
        rows.append({"file_name": f"images/{name}", "reference_image": reference,
                     "text": _edit_text(edit, index not in bare)})
    with open(out / "metadata.jsonl", "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return out
