"""Why `datasets` could not open a local dataset, said by file and line.

`datasets` stops at the first cell it cannot fit into a column ("JSON parse error:
Column(/text) changed from string to number") or at an empty file (an IndexError deep
inside its builder), and says neither which file nor which line. When it fails on a
local folder, difftune reads the folder's metadata files and data files itself and
names what is wrong: the line, the key, the value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

METADATA_FILES = ("metadata.jsonl", "metadata.json", "metadata.csv")
SHOWN = 5


def explain_load_failure(path: Path, error: BaseException) -> str:
    """A sentence (or a few lines) naming the file, line and key that broke loading."""
    if path.is_dir():
        for metadata in sorted(path.rglob("metadata.jsonl")):
            problems = jsonl_problems(metadata, path)
            if problems:
                return _listed(metadata, problems)
        for table in sorted([*path.rglob("*.parquet"), *path.rglob("*.arrow")]):
            problem = table_problem(table)
            if problem:
                return f"{table}: {problem}"
    if not path.exists():
        return f"not a local folder or file, and not a Hub dataset that can be loaded now ({_innermost(error)})"
    return f"cannot open the dataset ({_innermost(error)})"


def jsonl_problems(metadata: Path, root: Path) -> list[str]:
    """Each line that `datasets` would choke on: not UTF-8, not a JSON object, a key whose
    type differs from the other lines', a file_name that leaves the folder."""
    raw = metadata.read_bytes()
    if not raw.strip():
        return ["the file is empty: it lists no rows"]
    problems: list[str] = []
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as bad:
            problems.append(f"line {number} is not UTF-8 text (byte {line[bad.start]:#x} at {bad.start}); "
                            "save the file as UTF-8")
            continue
        except ValueError as bad:
            problems.append(f"line {number} is not valid JSON ({bad.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"line {number} is a JSON {type(row).__name__}, not an object")
            continue
        rows.append((number, row))
    problems += _type_changes(rows) + _escaping_files(rows, metadata.parent, root)
    return problems


def _type_changes(rows: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """Lines where a key's value has another type than on most lines (null is allowed)."""
    kinds: dict[str, dict[str, list[int]]] = {}
    for number, row in rows:
        for key, value in row.items():
            if value is not None:
                kinds.setdefault(key, {}).setdefault(_kind(value), []).append(number)
    problems = []
    for key, by_kind in kinds.items():
        if len(by_kind) < 2:
            continue
        usual = max(by_kind, key=lambda kind: len(by_kind[kind]))
        for kind, numbers in by_kind.items():
            if kind != usual:
                problems += [f"line {n}: {key!r} is {kind}, where other lines have {usual}" for n in numbers]
    return sorted(problems, key=lambda p: int(p.split(":")[0].removeprefix("line ")))


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _escaping_files(rows: list[tuple[int, dict[str, Any]]], folder: Path, root: Path) -> list[str]:
    problems = []
    inside = os.path.abspath(root) + os.sep  # lexically: a symlink to a file elsewhere is fine
    for number, row in rows:
        for key, value in row.items():
            if (key == "file_name" or key.endswith("_file_name")) and isinstance(value, str):
                if not os.path.abspath(folder / value).startswith(inside):
                    problems.append(f"line {number}: {key} {value!r} points outside the dataset folder {root}")
    return problems


def table_problem(table: Path) -> str | None:
    """A parquet or arrow file with no rows or that pyarrow cannot read."""
    try:
        if table.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(table).metadata.num_rows
        else:
            import pyarrow as pa

            with pa.memory_map(str(table)) as source:
                rows = pa.ipc.open_stream(source).read_all().num_rows
    except Exception as error:  # noqa: BLE001 (pyarrow raises many kinds for a bad file)
        return f"not a readable {table.suffix[1:]} file ({type(error).__name__}: {error})"
    return "the file has no rows" if rows == 0 else None


def _listed(metadata: Path, problems: list[str]) -> str:
    shown = problems[:SHOWN]
    more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return f"{metadata}:\n" + "\n".join(f"  {p}" for p in shown) + more


def _innermost(error: BaseException) -> str:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return f"{type(error).__name__}: {error}"
