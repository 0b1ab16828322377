"""report.html: one self-contained page (inline SVG, embedded PNGs) a browser opens from disk.

It holds the run's facts (base, method, data, duration, every start, stop and resume),
the loss, learning-rate, throughput and metric curves with labelled axes, and the
validation grids over time with the prompt of each.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any

from difftune.rundir import read_events

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 640, 230, 64, 150, 28, 34
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
TICKS = 5


def ticks(low: float, high: float, count: int = TICKS) -> list[float]:
    """About `count` round values from low to high (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], y_label: str,
               y_range: tuple[float, float] | None = None, x_label: str = "step") -> str:
    """An SVG line chart of named (x, y) series with ticks on both axes; dashed lines for
    names starting with 'floor'."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    y_low, y_high = y_range or (min(ys), max(ys))
    if y_high <= y_low:
        y_low, y_high = y_low - 0.5 * (abs(y_low) or 1), y_high + 0.5 * (abs(y_high) or 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (y - y_low) / (y_high - y_low) * plot_h

    parts = [f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
             f'<text x="{LEFT}" y="16" font-size="14">{html.escape(title)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>']
    for value in ticks(y_low, y_high):
        parts.append(f'<line x1="{LEFT - 4}" x2="{LEFT + plot_w}" y1="{py(value):.1f}" y2="{py(value):.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{py(value) + 4:.1f}" text-anchor="end">{value:.3g}</text>')
    for value in ticks(x_low, x_high):
        parts.append(f'<line x1="{px(value):.1f}" x2="{px(value):.1f}" y1="{TOP + plot_h}" y2="{TOP + plot_h + 4}" '
                     'stroke="#999"/>')
        parts.append(f'<text x="{px(value):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{value:g}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 4}" text-anchor="middle">{html.escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{TOP + plot_h / 2:.0f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {TOP + plot_h / 2:.0f})">{html.escape(y_label)}</text>')
    for index, (name, values) in enumerate(series.items()):
        values = [v for v in values if math.isfinite(v[1])]
        if not values:
            continue
        colour = COLOURS[index % len(COLOURS)]
        dash = ' stroke-dasharray="6 4"' if name.startswith("floor") else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in values)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{LEFT + plot_w + 8}" y="{TOP + 12 + 14 * index}" fill="{colour}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _image_tag(path: Path, height: int = 96) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<img src="data:image/png;base64,{data}" title="{html.escape(path.name)}" '
            f'style="image-rendering:pixelated;height:{height}px;margin:0 8px 8px 0">')


def number(value: Any) -> float:
    """events.jsonl writes a non-finite value as null; anything else not a number (a line
    edited by hand) reads as NaN too, so one odd value never breaks a page."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value)


SMOOTHING = 10
"""The loss curve's smoothing window, in step events."""


def step_rows(events: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One row per step event, the numbers the curves draw: step, loss, the loss's mean over
    the last SMOOTHING finite values, lr and samples/s (NaN where not a number). Both the
    report and `difftune watch` draw from these rows."""
    steps = [e for e in events if e.get("event") == "step" and math.isfinite(number(e.get("step")))]
    rows, recent = [], []
    for event in steps:
        loss = number(event.get("loss"))
        if math.isfinite(loss):
            recent = (recent + [loss])[-SMOOTHING:]
        # By position, not by step: a resumed run logs the steps after its checkpoint again.
        rows.append({"step": number(event["step"]), "loss": loss,
                     "smoothed": sum(recent) / len(recent) if recent else float("nan"),
                     "lr": number(event.get("lr")), "samples_per_s": number(event.get("samples_per_s"))})
    return rows


def _metric_series(validations: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Each validation metric over the steps, and its floor (control off) as a flat
    "floor NAME" line from step 0 to the last validation."""
    series: dict[str, list[tuple[float, float]]] = {}
    for event in validations:
        metrics = event.get("metrics")
        for name, value in (metrics.items() if isinstance(metrics, dict) else ()):
            series.setdefault(str(name), []).append((number(event.get("step")), number(value)))
    last_step = number(validations[-1].get("step")) if validations else 0
    floor = next((e["floor"] for e in validations if isinstance(e.get("floor"), dict) and e["floor"]), {})
    for name, value in floor.items():
        series[f"floor {name}"] = [(0, number(value)), (last_step, number(value))]
    return series


def _setting(config: dict[str, Any], section: str, key: str) -> Any:
    """config[section][key], or "?" where a hand-edited or partial config.toml lacks it."""
    values = config.get(section)
    return values.get(key, "?") if isinstance(values, dict) else "?"


def config_facts(config: Any) -> list[str]:
    """What the run trains, on what, and how: a RunConfig, or a config.toml read as a dict
    (`difftune watch` reads the file, so a run copied from elsewhere shows it too)."""
    if config is None:
        return []
    settings = config if isinstance(config, dict) else config.model_dump()

    def get(section: str, key: str) -> Any:
        return _setting(settings, section, key)

    return [f"method: {get('method', 'kind')}; base: {get('model', 'pretrained')}",
            f"data: {get('data', 'path')} at {get('data', 'resolution')} px; batch {get('train', 'batch_size')} x "
            f"{get('train', 'gradient_accumulation_steps')} accumulation; learning rate "
            f"{get('train', 'learning_rate')} ({get('train', 'lr_scheduler')}); precision "
            f"{get('train', 'mixed_precision')}"]


def run_facts(events: list[dict[str, Any]], config: Any) -> list[str]:
    """What the run is and what happened to it, one line each (config: see config_facts)."""
    facts = config_facts(config)
    starts = [e for e in events if e["event"] == "start"]
    if starts:
        first, last = starts[0]["time"], events[-1]["time"]
        facts.append(f"started {time.strftime('%Y-%m-%d %H:%M', time.localtime(first))}; "
                     f"{(last - first) / 60:.1f} min from the first start to the last event")
    before_start: list[str] = []  # written while a run sets up, said after its start
    for event in events:
        if event["event"] == "start":
            how = f"resumed from {Path(event['resumed_from']).name}" if event.get("resumed_from") else "started"
            facts.append(f"{how} at step {event['step']} of {event.get('max_steps')}")
            facts += before_start
            before_start = []
        elif event["event"] == "stopped":
            facts.append(f"stopped at step {event['step']} ({event.get('reason') or 'signal'})")
        elif event["event"] == "config_changed":
            before_start.append("settings changed on resume: " + "; ".join(event.get("changes", [])))
        elif event["event"] == "checkpoint_skipped":
            before_start.append(f"checkpoint passed over: {event.get('problem')}")
        elif event["event"] == "final":
            facts.append(f"final/ written at step {event['step']}")
    return facts


def write_report(run_dir: Path, config: Any = None) -> Path:
    """Run facts, the loss, learning-rate and throughput curves, metric curves against
    their floor, and the validation grids over time (written atomically)."""
    events = read_events(run_dir)
    steps = [e for e in events if e["event"] == "step"]
    validations = [e for e in events if e["event"] == "validation"]
    title = f"{config.method.kind} - {run_dir.name}" if config is not None else run_dir.name
    body = [f"<h1>{html.escape(title)}</h1>", "<ul>"]
    body += [f"<li>{html.escape(fact)}</li>" for fact in run_facts(events, config)]
    body.append("</ul>")
    if steps:
        last = steps[-1]
        body.append(f"<p>step {last['step']}, loss {number(last['loss']):.4f}, "
                    f"{number(last.get('samples_per_s')):.1f} samples/s, peak memory "
                    f"{number(last.get('peak_memory_mb')):.0f} MB</p>")
        rows = step_rows(events)

        def curve(key: str) -> list[tuple[float, float]]:
            return [(row["step"], row[key]) for row in rows]

        body.append(line_chart("training loss", {"loss": curve("loss"), f"mean of {SMOOTHING}": curve("smoothed")},
                               "loss"))
        body.append(line_chart("learning rate", {"lr": curve("lr")}, "lr"))
        body.append(line_chart("throughput", {"samples/s": curve("samples_per_s")}, "samples/s"))
    if any(e.get("metrics") for e in validations):
        latest = [e for e in validations if e.get("metrics")][-1]
        summary = ", ".join(f"{k} {number(v):.3f}" for k, v in (latest.get("metrics") or {}).items())
        floor = ", ".join(f"{k} {number(v):.3f}" for k, v in (latest.get("floor") or {}).items())
        body.append(f"<p>latest metrics: {summary}; floor (control off): {floor or 'n/a'}</p>")
        body.append(line_chart("control metrics (dashed: floor)", _metric_series(validations), "score", (0.0, 1.0)))
    body.append(_grids(run_dir))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) +
            "</title><style>body{font-family:sans-serif;margin:24px} td{vertical-align:top;padding:4px}"
            "</style></head><body>" + "\n".join(body) + "</body></html>")
    path = run_dir / "report.html"
    partial = path.with_name(".report.html.partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)
    return path


def validation_steps(run_dir: Path) -> list[dict[str, Any]]:
    """Each validation/step-NNNNNN/ folder, oldest first: its name, its step (None when the
    name has no number), each pair's grid with its prompt (prompts.json), and its metric
    grid (None without a metric). Both the report and `difftune watch` show these."""
    found = []
    for folder in sorted((run_dir / "validation").glob("step-*")):
        if not folder.is_dir():
            continue
        prompts = validation_prompts(folder)
        grids = []
        for grid_file in sorted(folder.glob("pair-*-grid.png")):
            pair = prompts.get(grid_file.name.removesuffix("-grid.png"))
            prompt = pair.get("prompt") if isinstance(pair, dict) else None
            grids.append({"file": grid_file, "prompt": prompt if isinstance(prompt, str) else ""})
        metric = folder / "metric-grid.png"
        digits = folder.name.removeprefix("step-")
        found.append({"name": folder.name, "step": int(digits) if digits.isdigit() else None, "folder": folder,
                      "grids": grids, "metric_grid": metric if metric.is_file() else None})
    return found


def floor_grid(run_dir: Path) -> Path | None:
    """validation/floor/metric-grid.png: the base with its control off (with a metric only)."""
    floor = run_dir / "validation" / "floor" / "metric-grid.png"
    return floor if floor.is_file() else None


def _grids(run_dir: Path) -> str:
    floor = floor_grid(run_dir)
    rows = ["<h2>validation over time</h2>",
            "<p>Per step: one grid per validation prompt (conditioning, then generated images), "
            "then the held-out metric set (conditionings above, generated below).</p>"]
    if floor is not None:
        rows.append(f"<h3>floor (control off)</h3><div>{_image_tag(floor, 160)}</div>")
    for found in validation_steps(run_dir):
        cells = []
        for grid in found["grids"]:
            cells.append(f"<figure style='display:inline-block;margin:0 8px 8px 0'>{_image_tag(grid['file'], 140)}"
                         f"<figcaption>{html.escape(grid['prompt'])}</figcaption></figure>")
        if found["metric_grid"] is not None:
            cells.append(_image_tag(found["metric_grid"], 160))
        rows.append(f"<h3>{html.escape(found['name'])}</h3><div>{''.join(cells)}</div>")
    return "\n".join(rows)


def validation_prompts(folder: Path) -> dict[str, Any]:
    """A validation step's prompts.json ({"pair-00": {"prompt", "image"}}), or {} when it
    is missing, unreadable or not an object."""
    try:
        prompts = json.loads((folder / "prompts.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return prompts if isinstance(prompts, dict) else {}
