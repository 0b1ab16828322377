"""report.html: one self-contained page (inline SVG, embedded PNGs) a browser opens from disk."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from difftune.training.events import read_events

WIDTH, HEIGHT, PAD = 640, 220, 40
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]


def _scale(values: list[float], low: float, high: float, size: int, flip: bool) -> list[float]:
    span = (high - low) or 1.0
    scaled = [(v - low) / span * (size - 2 * PAD) + PAD for v in values]
    return [size - s for s in scaled] if flip else scaled


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], y_range: tuple[float, float] | None = None) -> str:
    """An SVG line chart of named (x, y) series; dashed lines for names starting 'floor'."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    y_low, y_high = y_range or (min(ys), max(ys))
    parts = [f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{PAD}" y="18" font-size="14">{html.escape(title)}</text>',
             f'<text x="4" y="{HEIGHT - PAD}" font-size="11">{y_low:.3g}</text>',
             f'<text x="4" y="{PAD}" font-size="11">{y_high:.3g}</text>',
             f'<text x="{WIDTH - PAD}" y="{HEIGHT - 8}" font-size="11" text-anchor="end">step {x_high:g}</text>',
             f'<rect x="{PAD}" y="{PAD}" width="{WIDTH - 2 * PAD}" height="{HEIGHT - 2 * PAD}" fill="none" stroke="#ccc"/>']
    for index, (name, values) in enumerate(series.items()):
        values = [v for v in values if math.isfinite(v[1])]
        if not values:
            continue
        px = _scale([v[0] for v in values], x_low, x_high, WIDTH, False)
        py = _scale([v[1] for v in values], y_low, y_high, HEIGHT, True)
        colour = COLOURS[index % len(COLOURS)]
        dash = ' stroke-dasharray="6 4"' if name.startswith("floor") else ""
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(px, py))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{WIDTH - PAD + 4 - 120}" y="{PAD + 14 * (index + 1)}" font-size="11" '
                     f'fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _image_tag(path: Path, height: int = 96) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<img src="data:image/png;base64,{data}" title="{html.escape(path.name)}" '
            f'style="image-rendering:pixelated;height:{height}px;margin:0 8px 8px 0">')


def _number(value: float | None) -> float:
    """events.jsonl writes a non-finite value as null."""
    return float("nan") if value is None else float(value)


def _moving_mean(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Each point's mean over the last `window` finite values (the loss is noisy: each
    step draws other timesteps)."""
    smoothed, recent = [], []
    for x, y in points:
        if math.isfinite(y):
            recent = (recent + [y])[-window:]
        if recent:
            smoothed.append((x, sum(recent) / len(recent)))
    return smoothed


def _metric_series(validations: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for event in validations:
        for name, value in (event.get("metrics") or {}).items():
            series.setdefault(name, []).append((event["step"], _number(value)))
    last_step = validations[-1]["step"] if validations else 0
    floor = next((e["floor"] for e in validations if e.get("floor")), None) or {}
    for name, value in floor.items():
        series[f"floor {name}"] = [(0, _number(value)), (last_step, _number(value))]
    return series


def write_report(run_dir: Path, title: str) -> Path:
    """Loss curve, metric curves against their floor, and the validation grids over time."""
    events = read_events(run_dir)
    steps = [e for e in events if e["event"] == "step"]
    validations = [e for e in events if e["event"] == "validation"]
    body = [f"<h1>{html.escape(title)}</h1>"]
    if steps:
        last = steps[-1]
        body.append(f"<p>step {last['step']}, loss {_number(last['loss']):.4f}, "
                    f"{last['samples_per_s']:.1f} samples/s, peak memory {last['peak_memory_mb']:.0f} MB</p>")
        losses = [(e["step"], _number(e["loss"])) for e in steps]
        body.append(line_chart("training loss", {"loss": losses, "loss, mean of 10": _moving_mean(losses, 10)}))
    if any(e.get("metrics") for e in validations):
        latest = validations[-1]
        summary = ", ".join(f"{k} {_number(v):.3f}" for k, v in (latest.get("metrics") or {}).items())
        floor = ", ".join(f"{k} {_number(v):.3f}" for k, v in (latest.get("floor") or {}).items())
        body.append(f"<p>latest metrics: {summary}; floor (control off): {floor or 'n/a'}</p>")
        body.append(line_chart("control metrics (dashed: floor)", _metric_series(validations), (0.0, 1.0)))
    body.append(_grids(run_dir))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) +
            "</title><style>body{font-family:sans-serif;margin:24px} td{vertical-align:top;padding:4px}"
            "</style></head><body>" + "\n".join(body) + "</body></html>")
    path = run_dir / "report.html"
    path.write_text(page)
    return path


def _grids(run_dir: Path) -> str:
    folders = sorted((run_dir / "validation").glob("step-*"))
    floor = run_dir / "validation" / "floor" / "metric-grid.png"
    rows = ["<h2>validation over time</h2>",
            "<p>Per step: one grid per validation prompt (conditioning, then generated images), "
            "then the held-out metric set (conditionings above, generated below).</p>"]
    if floor.is_file():
        rows.append(f"<h3>floor (control off)</h3><div>{_image_tag(floor, 128)}</div>")
    for folder in folders:
        images = sorted(folder.glob("pair-*-grid.png")) + sorted(folder.glob("metric-grid.png"))
        tags = "".join(_image_tag(p, 128 if p.name == "metric-grid.png" else 64) for p in images)
        rows.append(f"<h3>{folder.name}</h3><div>{tags}</div>")
    return "\n".join(rows)
