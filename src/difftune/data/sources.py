"""Where rows come from: local folders (imagefolder + metadata.jsonl, parquet, arrow,
save_to_disk) and Hub datasets, all through `datasets`, with the column mapping applied."""

from __future__ import annotations

import contextlib
import io
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image, UnidentifiedImageError

from difftune.config import DataConfig
from difftune.data.diagnose import explain_load_failure
from difftune.data.images import open_oriented, to_rgb
from difftune.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DATA_FILE_SUFFIXES = frozenset({".jsonl", ".json", ".csv", ".parquet", ".arrow"})


@dataclass(frozen=True)
class Columns:
    image: str
    caption: str | None
    """None when every sample takes one fixed prompt (DreamBooth's instance/class prompt)."""
    conditioning: str | None
    references: bool = False
    """Whether the conditioning column holds an edit's references: optional per row, and a
    list of images where a row has several."""


def is_caption_folder(path: Path) -> bool:
    """A folder of images (any depth) and no data files: kohya/DreamBooth style, each
    image's caption, if any, in a .txt file of the same name."""
    if not path.is_dir():
        return False
    files = [f for f in path.rglob("*") if f.is_file() and not _hidden(f, path)]
    if any(f.suffix.lower() in DATA_FILE_SUFFIXES for f in files):
        return False
    return any(f.suffix.lower() in IMAGE_SUFFIXES for f in files)


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def caption_folder_rows(path: Path, config: DataConfig) -> datasets.Dataset:
    """Rows of (image path relative to the folder, caption from image.txt).

    Either every image has a caption file or none has: a partial set is reported, not
    silently trained with empty captions."""
    # Anything named like an image that is not a folder: a FIFO or a device named .png is
    # kept, so the scan reports it instead of it vanishing from the data without a word.
    images = sorted(
        f for f in path.rglob("*")
        if not f.is_dir() and f.suffix.lower() in IMAGE_SUFFIXES and not _hidden(f, path)
    )
    captions = [f.with_suffix(".txt") for f in images]
    present = [c.is_file() for c in captions]
    columns = {config.image_column: [str(f.relative_to(path)) for f in images]}
    if any(present) and not all(present):
        missing = [str(c.relative_to(path)) for c, ok in zip(captions, present) if not ok]
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise DataError(f"data.path {config.path!r}: {len(missing)} image(s) lack a caption file: {shown}")
    if all(present):
        columns[config.caption_column] = [read_caption(c) for c in captions]
    return datasets.Dataset.from_dict(columns)


MAX_CAPTION_BYTES = 1 << 20


def read_caption(file: Path) -> str:
    """A caption file's text, naming the file when it is not UTF-8 text or not a file."""
    problem = regular_file_problem(file, MAX_CAPTION_BYTES)
    if problem:
        raise DataError(f"caption file {file}: {problem}")
    try:
        return file.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise DataError(f"caption file {file} is not UTF-8 text (byte {error.object[error.start]:#x} at "
                        f"{error.start}); save it as UTF-8") from None


MAX_IMAGE_BYTES = 1 << 31
"""No image file difftune reads is larger (2 GiB): a bigger one is a mistake, not a photo."""


def image_problem(path: Path) -> str | None:
    """Why a file cannot be used as an image (None: PIL reads its header)."""
    problem = regular_file_problem(path)
    if problem:
        return problem
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # noqa: BLE001 (PIL raises many kinds for a bad file)
        return f"not an image PIL can read ({type(error).__name__}: {error})"
    return None


def regular_file_problem(path: Path, limit: int = MAX_IMAGE_BYTES) -> str | None:
    """Why a path cannot be read as a file: it is missing, a FIFO or a device (reading
    would block, or never end: /dev/zero), or larger than `limit` bytes."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return f"cannot read it ({error.strerror or type(error).__name__})"
    if not stat.S_ISREG(status.st_mode):
        kind = ("a folder" if stat.S_ISDIR(status.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(status.st_mode)
                else "a device" if stat.S_ISCHR(status.st_mode) or stat.S_ISBLK(status.st_mode) else "a socket")
        return f"not a regular file: it is {kind}"
    if status.st_size > limit:
        return f"{status.st_size / 2**30:.1f} GiB, more than the {limit / 2**30:.0f} GiB limit"
    return None


def load_rows(config: DataConfig, seed: int, key: str = "data.path") -> datasets.Dataset:
    """Open the dataset split, keep max_samples (shuffled with the seed first). `key` is
    the config key messages name (validation.metric_data opens its data here too)."""
    path = Path(config.path)
    try:
        with _quiet_if_local(path):
            rows = _open_rows(path, config)
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 (datasets raises many kinds; each is explained)
        raise DataError(f"{key} {config.path!r}: {explain_load_failure(path, error)}") from None
    if config.max_samples is not None and config.max_samples < len(rows):
        rows = rows.shuffle(seed=seed).select(range(config.max_samples))
    return rows


@contextlib.contextmanager
def _quiet_if_local(path: Path) -> Iterator[None]:
    """No "Downloading data" / "Generating train split" bars for a local folder (they
    read files, and flash by on every run); a Hub download keeps its bars."""
    if not path.exists() or not datasets.utils.logging.is_progress_bar_enabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _open_rows(path: Path, config: DataConfig) -> datasets.Dataset:
    """The split's rows: a caption folder, a save_to_disk folder, or anything `datasets`
    loads (an imagefolder, parquet, arrow, a Hub dataset)."""
    if is_caption_folder(path):
        return caption_folder_rows(path, config)
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        rows = datasets.load_from_disk(str(path))
        return rows[config.split] if isinstance(rows, datasets.DatasetDict) else rows
    return datasets.load_dataset(config.path, config.config_name, split=config.split, cache_dir=config.cache_dir)


def check_columns(
    rows: datasets.Dataset, config: DataConfig, needs_conditioning: bool, needs_captions: bool = True,
    references: bool = False,
) -> Columns:
    """Every configured column exists; say which key names a missing one. With
    `references`, the conditioning images are an edit's references (data.reference_image_column)."""
    wanted = {"data.image_column": config.image_column}
    if needs_captions:
        wanted["data.caption_column"] = config.caption_column
    conditioning_key = "reference_image_column" if references else "conditioning_image_column"
    if needs_conditioning:
        wanted[f"data.{conditioning_key}"] = getattr(config, conditioning_key)
    available = list(rows.column_names)
    problems = [
        f"{key} = {name!r} is not a column of {config.path} (columns: {', '.join(available)})"
        for key, name in wanted.items()
        if name not in available
    ]
    if problems:
        raise DataError("\n".join(problems))
    return Columns(
        image=config.image_column,
        caption=config.caption_column if needs_captions else None,
        conditioning=getattr(config, conditioning_key) if needs_conditioning else None,
        references=references and needs_conditioning,
    )


def undecoded(rows: datasets.Dataset, columns: Columns) -> datasets.Dataset:
    """Image columns left undecoded ({"bytes", "path"}), so decoding happens where a bad
    file can be reported by row and name instead of failing inside `datasets`."""
    for column in (columns.image, columns.conditioning):
        feature = undecoded_feature(rows.features[column]) if column is not None else None
        if feature is not None:
            rows = rows.cast_column(column, feature)
    return rows


def undecoded_feature(feature: Any) -> Any:
    """An image column's feature left undecoded: an Image, or a list of them (an edit's
    several references); None for a column of anything else."""
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
        return datasets.List(datasets.Image(decode=False))
    return None


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return repr(value.get("path") or "<bytes>")
    return repr(value) if isinstance(value, str) else f"<{type(value).__name__}>"


def image_source(value: Any, root: Path) -> Path | io.BytesIO | None:
    """What PIL should open for a cell: a file under root, or in-memory bytes."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    if isinstance(value, str):
        return root / value
    return None


def reference_cells(value: Any) -> list[Any]:
    """An edit row's reference images: none (an empty cell: the row trains as
    text-to-image), one, or a list of several."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, dict) and not value.get("bytes") and not value.get("path"):
        return []  # an undecoded Image cell left empty
    if isinstance(value, (list, tuple)):
        return [cell for cell in value if reference_cells(cell)]
    return [value]


@dataclass(frozen=True)
class ReferenceLimit:
    """How many references one row may have: the family's edit pipeline takes that many
    per prompt (`most`; None: any number). Here, not beside the edit samples: the checks
    before a run (training.source_checks) use it before torch is imported."""

    most: int | None
    pipeline: str
    """The edit pipeline's class name, for messages."""

    def problem(self, count: int) -> str | None:
        """Why a row with `count` references cannot be trained on, if it cannot."""
        if self.most is None or count <= self.most:
            return None
        return f"{count} reference images, and {self.pipeline} takes {self.most} per prompt"


def open_image(value: Any, root: Path, where: str) -> Image.Image:
    """A cell's image as RGB, upright (images.to_rgb): a decoded image, bytes, a path, or
    an undecoded Image."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    source = image_source(value, root)
    if source is None:
        raise DataError(f"{where}: expected an image, bytes or a path, got {type(value).__name__}")
    problem = regular_file_problem(source) if isinstance(source, Path) else None
    if problem:
        raise DataError(f"{where}: {source}: {problem}")
    try:
        return open_oriented(source)
    except UnidentifiedImageError:
        raise DataError(f"{where}: unreadable image{_named(value)}: {_not_an_image(source)}") from None
    except Exception as error:
        raise DataError(f"{where}: unreadable image{_named(value)} ({type(error).__name__}: {error})") from None


def _named(value: Any) -> str:
    """The cell's file, when it names one (bytes have no name worth a word)."""
    return "" if isinstance(value, (bytes, bytearray)) else f" {_short(value)}"


def _not_an_image(source: Path | io.BytesIO) -> str:
    """What a file PIL cannot identify holds, in words: PIL's own message names a
    BytesIO object; the first bytes say more (text, HTML, a Git LFS pointer, ...)."""
    if isinstance(source, io.BytesIO):
        start = source.getvalue()[:16]
    else:
        try:
            with source.open("rb") as handle:
                start = handle.read(16)
        except OSError as error:
            return f"it cannot be read ({error.strerror or type(error).__name__})"
    return f"it is not an image (it starts with {start!r})" if start else "it is empty (0 bytes)"
