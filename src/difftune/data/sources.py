"""Where rows come from: local folders (imagefolder + metadata.jsonl, parquet, arrow,
save_to_disk) and Hub datasets, all through `datasets`, with the column mapping applied."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from difftune.config import DataConfig


class DataError(ValueError):
    """A dataset problem, naming the dataset, column, row or file."""


@dataclass(frozen=True)
class Columns:
    image: str
    caption: str
    conditioning: str | None


def load_rows(config: DataConfig, seed: int) -> datasets.Dataset:
    """Open the dataset split, keep max_samples (shuffled with the seed first)."""
    path = Path(config.path)
    try:
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            rows = datasets.load_from_disk(str(path))
            if isinstance(rows, datasets.DatasetDict):
                rows = rows[config.split]
        else:
            rows = datasets.load_dataset(
                config.path, config.config_name, split=config.split, cache_dir=config.cache_dir
            )
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise DataError(f"data.path {config.path!r}: cannot open dataset: {error}") from None
    if config.max_samples is not None and config.max_samples < len(rows):
        rows = rows.shuffle(seed=seed).select(range(config.max_samples))
    return rows


def check_columns(rows: datasets.Dataset, config: DataConfig, needs_conditioning: bool) -> Columns:
    """Every configured column exists; say which key names a missing one."""
    wanted = {"data.image_column": config.image_column, "data.caption_column": config.caption_column}
    if needs_conditioning:
        wanted["data.conditioning_image_column"] = config.conditioning_image_column
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
        caption=config.caption_column,
        conditioning=config.conditioning_image_column if needs_conditioning else None,
    )


def check_files(rows: datasets.Dataset, columns: Columns, root: Path) -> None:
    """Columns that hold file paths (as metadata.jsonl folders do) point at readable images."""
    for column in (columns.image, columns.conditioning):
        if column is None or not _holds_paths(rows, column):
            continue
        problems = []
        for index, value in enumerate(rows[column]):
            problem = _image_file_problem(root / value)
            if problem:
                problems.append(f"row {index}, {column} = {value!r}: {problem}")
        if problems:
            shown = "\n".join(problems[:20])
            more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DataError(f"{len(problems)} bad file(s) in {root}:\n{shown}{more}")


def _holds_paths(rows: datasets.Dataset, column: str) -> bool:
    feature = rows.features[column]
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _image_file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"no such file {path}"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for a bad file
        return f"unreadable image {path} ({type(error).__name__}: {error})"
    return None


def open_image(value: Any, root: Path, where: str) -> Image.Image:
    """A row's image as RGB, whether the column holds decoded images or paths."""
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, str):
            with Image.open(root / value) as image:
                return image.convert("RGB")
        if isinstance(value, dict) and value.get("bytes") is not None:
            import io

            return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    except Exception as error:
        raise DataError(f"{where}: unreadable image ({type(error).__name__}: {error})") from None
    raise DataError(f"{where}: expected an image or a path, got {type(value).__name__}")
