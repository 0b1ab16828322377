"""`difftune data prepare IN OUT`: a folder of images (with conditioning images and
captions, where there are any) filtered into a dataset `difftune train` reads as it
is, and a JSON report of what happened to every file.

Every image is measured once on a worker process (filters.measure) and the measures go
to a journal, so a stopped job measures only what is left. The filters then decide
(fast, all at once: duplicates need every file) and the kept rows are written.

Besides the filters' reasons (filters.py), an input is dropped, never read, as
`outside_input` when a file it names points outside IN or --conditioning (inputs.py);
as `bad_name` when its file name is not UTF-8 text (metadata.jsonl cannot hold it);
and in an imagefolder as `name_clash` when an earlier kept input writes the same output
file ("a.png" and "images/a.png" are both images/a.png): nothing is written over.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from difftune.data.build.filters import (
    FilterSettings,
    Measures,
    duplicate_reasons,
    measure,
    single_file_reason,
)
from difftune.data.build.inputs import Item, read_inputs
from difftune.data.build.jobs import (
    BOOKKEEPING,
    Journal,
    Progress,
    bookkeeping,
    map_on_cores,
    write_json,
)
from difftune.data.build.limits import check_prepare
from difftune.data.build.output import Output, claim_output
from difftune.data.build.writers import (
    FORMATS,
    IMAGES,
    Row,
    conditioning_target,
    output_name,
    push_saved,
    write,
)
from difftune.errors import InputError

REPORT = "prepare-report.json"
JOURNAL = "prepare-journal.jsonl"
"""The measures: they hold whatever the settings, so a run with other ones reuses them."""
MEASURES_VERSION = 1
"""Bump when filters.measure changes what it records: older journals are then set aside."""


def prepare(source: Path, out: Path, settings: FilterSettings | None = None, form: str = "imagefolder",
            conditioning: Path | None = None, captions: Path | None = None, caption_column: str = "text",
            workers: int | None = None, shard_size: int = 1000, push_to_hub: str | None = None) -> dict[str, Any]:
    """Returns the report (also written to OUT/.difftune/prepare-report.json)."""
    settings = settings or FilterSettings()
    check_prepare(settings, workers, shard_size)
    if form not in FORMATS:
        raise InputError(f"--format {form!r}: one of {', '.join(FORMATS)}")
    items = read_inputs(source, conditioning, captions, caption_column)
    identity = {"input": str(source.resolve()), "format": form, "filters": asdict(settings),
                "conditioning": str(conditioning.resolve()) if conditioning else None,
                "captions": str(captions.resolve()) if captions else None, "caption_column": caption_column,
                "shard_size": shard_size if form == "webdataset" else None}
    output = claim_output("OUT", out, "prepare", {"IN": source, "--conditioning": conditioning,
                                                  "--captions": captions}, identity, carried=(JOURNAL,))
    measures = measure_all(items, output.folder, workers)
    reasons = decide(items, measures, settings)
    if form == "imagefolder":
        reasons.update(name_clashes(items, reasons))
    kept = [item for index, item in enumerate(items) if index not in reasons]
    rows = [Row(item.file, output_name(item.name), item.conditioning, item.caption) for item in kept]
    if not rows:
        _write_report(source, output, form, settings, items, reasons, {})
        untouched = f"; {out} was left as it was" if output.folder != out else ""
        raise InputError(f"every image in {source} was dropped: the reasons are in "
                         f"{output.folder / BOOKKEEPING / REPORT}{untouched}")
    written = write(rows, output.folder, form, shard_size, shown_as=out)
    report = _write_report(source, output, form, settings, items, reasons, written)
    output.finish()
    print(summary_line(report, out / BOOKKEEPING / REPORT), file=sys.stderr, flush=True)
    if push_to_hub:
        push_saved(out, push_to_hub)
    return report


def measure_all(items: list[Item], out: Path, workers: int | None) -> list[Measures]:
    """Every item's measures; an item with a file outside its folder is not read (decide
    drops it), and stands here as a blank."""
    journal = Journal(bookkeeping(out) / JOURNAL, {"measures": MEASURES_VERSION})
    keys = [None if item.outside or item.bad_name else _identity(item) for item in items]
    todo = [(key, item) for key, item in zip(keys, items) if key is not None and key not in journal.done]
    progress = Progress("prepare: measuring", len(items), already=len(items) - len(todo))
    try:
        for (key, _), result in zip(todo, map_on_cores(measure, [item for _, item in todo], workers)):
            journal.record(key, {"measures": result.as_dict()})
            progress.advance()
    finally:
        journal.close()
    return [Measures(**journal.done[key]["measures"]) if key is not None else Measures() for key in keys]


def _identity(item: Item) -> str:
    """A file measured before and unchanged since (same size and time) is not measured again."""
    try:
        status = item.file.stat()
        files = f"{status.st_size}:{status.st_mtime_ns}"
    except OSError:
        files = "missing"
    if item.conditioning is not None:
        try:
            status = item.conditioning.stat()
            files += f"|{item.conditioning}:{status.st_size}:{status.st_mtime_ns}"
        except OSError:
            files += f"|{item.conditioning}:missing"
    return f"{item.name}|{files}"


def decide(items: list[Item], measures: list[Measures], settings: FilterSettings) -> dict[int, tuple[str, str]]:
    """index -> (reason, detail) for every dropped input."""
    paired = any(item.conditioning is not None for item in items)
    reasons: dict[int, tuple[str, str]] = {}
    for index, (item, m) in enumerate(zip(items, measures)):
        reason = (("outside_input", item.outside) if item.outside else ("bad_name", item.bad_name) if item.bad_name
                  else single_file_reason(m, settings))
        if reason is None and item.caption_problem is not None:
            reason = ("bad_caption", item.caption_problem)
        if reason is None and paired and item.conditioning is None:
            reason = ("no_conditioning", "other images have a conditioning image and this one has none")
        if reason is not None:
            reasons[index] = reason
    kept = [i for i in range(len(items)) if i not in reasons]
    duplicates = duplicate_reasons([items[i].name for i in kept], [measures[i] for i in kept], settings)
    reasons.update({kept[i]: reason for i, reason in duplicates.items()})
    return reasons


def name_clashes(items: list[Item], reasons: dict[int, tuple[str, str]]) -> dict[int, tuple[str, str]]:
    """index -> reason for each kept input whose output file (image or conditioning image)
    an earlier kept input already has: the later is dropped, not written over the first."""
    owners: dict[str, int] = {}
    clashes: dict[int, tuple[str, str]] = {}
    for index, item in enumerate(items):
        if index in reasons:
            continue
        name = output_name(item.name)
        targets = [f"{IMAGES}/{name}"] + ([conditioning_target(name, item.conditioning)] if item.conditioning else [])
        taken = next((t for t in targets if t in owners), None)
        if taken is not None:
            clashes[index] = ("name_clash", f"its output file {taken} is already {items[owners[taken]].name}'s")
            continue
        owners.update(dict.fromkeys(targets, index))
    return clashes


def _write_report(source: Path, output: Output, form: str, settings: FilterSettings, items: list[Item],
                  reasons: dict[int, tuple[str, str]], written: dict[str, Any]) -> dict[str, Any]:
    """The report, into the folder this run writes (it names OUT); an empty one is also
    summed up on stderr here (a written one once it is in OUT)."""
    kept = [item for index, item in enumerate(items) if index not in reasons]
    report = {
        "verb": "prepare",
        "input": str(source),
        "output": str(output.final),
        "format": form,
        "settings": asdict(settings),
        "counts": {"input": len(items), "kept": len(kept), "dropped": len(reasons),
                   "dropped_by_reason": dict(Counter(reason for reason, _ in reasons.values()))},
        "dropped": [{"file": items[i].name, "reason": reason, "detail": detail}
                    for i, (reason, detail) in sorted(reasons.items())],
        "kept_with_caption": sum(item.caption is not None for item in kept),
        "kept_with_conditioning": sum(item.conditioning is not None for item in kept),
        "written": written,
    }
    path = bookkeeping(output.folder) / REPORT
    write_json(path, report)
    if not written:
        print(summary_line(report, path), file=sys.stderr, flush=True)
    return report


def summary_line(report: dict[str, Any], path: Path) -> str:
    counts = report["counts"]
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(counts["dropped_by_reason"].items()))
    return (f"prepare: kept {counts['kept']} of {counts['input']} image(s)"
            + (f"; dropped {counts['dropped']} ({reasons})" if counts["dropped"] else "")
            + f". Report: {path}")
