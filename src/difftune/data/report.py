"""The data check's report: findings by row, column and file, and their kinds."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

KINDS = (
    "missing_file",
    "not_a_file",
    "outside_dataset",
    "zero_byte",
    "unreadable",
    "truncated",
    "not_an_image_cell",
    "size_mismatch",
    "too_small",
    "extreme_aspect",
    "cmyk",
    "sixteen_bit",
    "palette",
    "alpha",
    "empty_caption",
    "bad_caption",
    "duplicate",
    "no_rows",
)

SUMMARY_FINDINGS = 20


@dataclass
class Finding:
    row: int
    """Index in the dataset as loaded (before max_samples and shuffling); -1 for the whole dataset."""
    column: str
    """The config's column name, e.g. "image", "conditioning_image", "text"."""
    file: str | None
    """The path as written in the dataset (relative to data.path when under it); None for bytes."""
    kind: str
    """One of KINDS."""
    message: str
    fatal: bool
    """True: the sample cannot be trained on. False: a note (converted, upscaled, duplicate)."""


@dataclass
class DataReport:
    path: str
    rows: int
    checked_columns: list[str]
    findings: list[Finding] = field(default_factory=list)
    full: bool = True

    @property
    def ok(self) -> bool:
        """No fatal finding: every sample can be trained on."""
        return not any(f.fatal for f in self.findings)

    def bad_rows(self) -> list[int]:
        """Rows with a fatal finding, sorted (dataset-wide findings are not rows)."""
        return sorted({f.row for f in self.findings if f.fatal and f.row >= 0})

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
        return counts

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "rows": self.rows,
            "full": self.full,
            "checked_columns": list(self.checked_columns),
            "bad_rows": self.bad_rows(),
            "counts": self.counts(),
            "findings": [asdict(f) for f in self.findings],
        }

    def summary(self, fatal_only: bool = False) -> str:
        """Counts per kind, then findings (what stops training first; with fatal_only,
        only those)."""
        bad = self.bad_rows()
        depth = "full scan (every file decoded)" if self.full else "fast scan (headers only)"
        lines = [f"{self.path}: {self.rows} rows, {len(bad)} bad, {depth}"]
        if bad:
            more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
            lines.append(f"  bad rows: {', '.join(map(str, bad[:20]))}{more}")
        fatal_kinds = {f.kind for f in self.findings if f.fatal}
        for kind, count in self.counts().items():
            lines.append(f"  {kind}: {count}{'' if kind in fatal_kinds else ' (note)'}")
        # What stops training first, then the notes.
        listed = [f for f in self.findings if f.fatal or not fatal_only]
        shown = sorted(listed, key=lambda f: not f.fatal)[:SUMMARY_FINDINGS]
        for finding in shown:
            where = "dataset" if finding.row < 0 else f"row {finding.row}"
            file = f", {finding.file}" if finding.file else ""
            lines.append(f"  {where}, {finding.column}{file}: {finding.message}")
        if len(listed) > SUMMARY_FINDINGS:
            lines.append(f"  ... and {len(listed) - SUMMARY_FINDINGS} more findings")
        if not self.findings:
            lines.append("  no problems found")
        return "\n".join(lines)
