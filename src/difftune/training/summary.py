"""What a run tells its user before the first step: the plan for the run directory (resumed,
changed settings, damaged checkpoints passed over), the data check, and a start summary
(where the run is, what trains, how many steps, where to watch it)."""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from difftune.data.check import write_report as write_data_report
from difftune.training.events import EventLog
from difftune.training.plan import RunPlan


def log_plan(plan: RunPlan, events: EventLog, console: Console, main: bool) -> None:
    """Damaged checkpoints passed over and settings changed on resume: said and recorded."""
    for problem in plan.skipped:
        events.write("checkpoint_skipped", problem=problem)
        if main:
            console.print(f"[yellow]warning:[/yellow] checkpoint {escape(problem)}; resuming from the one before",
                          highlight=False, soft_wrap=True)
    if plan.changes:
        events.write("config_changed", changes=plan.changes)
        if main:
            listed = "".join(f"\n  - {escape(change)}" for change in plan.changes)
            console.print(f"resuming with changed settings (recorded in config.toml and events.jsonl):{listed}",
                          highlight=False, soft_wrap=True)


def log_data_check(samples: Any, run_dir: Path, events: EventLog, console: Console) -> None:
    """The pre-training data check in the run directory (data-check.json) and events:
    every skipped row by file and reason, and the notes (conversions, upscaling)."""
    report = samples.report
    if report is None:
        return
    write_data_report(report, run_dir / "data-check.json")
    skipped = [asdict(f) for f in report.findings if f.fatal]
    events.write("data_check", rows=report.rows, trained_rows=len(samples),
                 skipped_rows=report.bad_rows(), counts=report.counts(), skipped=skipped)
    if skipped:
        console.log(f"data: skipping {len(report.bad_rows())} bad row(s) of {report.rows} "
                    f"(data.on_bad = \"skip\"); each is listed in {run_dir / 'data-check.json'}")
    notes = Counter(f.kind for f in report.findings if not f.fatal)
    if notes:
        described = ", ".join(f"{kind} {n}" for kind, n in notes.items())
        console.log(f"data notes ({described}): see {run_dir / 'data-check.json'}")


def start_summary(run: Any, step: int) -> list[str]:
    """The lines printed before the first step (and written as the "start" event)."""
    config, samples = run.config, run.sample_count
    train = config.train
    trained = sum(p.numel() for p in run.params)
    total = sum(p.numel() for m in run.trainee.parts.modules().values() for p in m.parameters())
    processes = run.accelerator.num_processes
    resumed = f"resuming from {run.resume_from.name} at step {step}" if run.resume_from else "a new run"
    epoch_steps = max(1, run.samples_per_epoch // run.samples_per_step)
    lines = [
        f"run: {run.run_dir} ({resumed})",
        f"model: {config.method.kind} on {config.model.pretrained}; {_count(trained)} trainable parameters "
        f"(the base has {_count(total)})",
        f"data: {samples} samples from {config.data.path}; batch {train.batch_size} x "
        f"{train.gradient_accumulation_steps} accumulation x {processes} process(es) = "
        f"{run.samples_per_step} samples a step, {epoch_steps} step(s) an epoch",
        f"steps: {step} -> {run.max_steps}; validation every {config.validation.every}, "
        f"a checkpoint every {train.checkpoint_every}",
        f"watch: {run.run_dir / 'report.html'}"
        + (f" or tensorboard --logdir {shlex.quote(str(run.run_dir / 'logs'))}"
           if train.report_to in ("tensorboard", "all") else ""),
    ]
    method_notes = [f"note: {note}" for note in config.method.batch_notes(train.batch_size)]
    return lines + small_data_notes(run, samples) + method_notes


def small_data_notes(run: Any, samples: int) -> list[str]:
    """What repeats when the data is smaller than a step, or an aspect bucket smaller
    than a batch (each batch comes from one bucket, padded with its own samples)."""
    train = run.config.train
    notes = []
    if samples < run.samples_per_step:
        notes.append(
            f"note: the data has {samples} sample(s), fewer than one step's {run.samples_per_step} (batch "
            f"{train.batch_size} x {train.gradient_accumulation_steps} accumulation x "
            f"{run.accelerator.num_processes} process(es)): each step repeats samples")
    per_bucket = run.sampler.summary() if hasattr(run.sampler, "summary") else {}
    small = sorted(name for name, count in per_bucket.items() if count < train.batch_size)
    if small:
        notes.append(
            f"note: {len(small)} of {len(per_bucket)} aspect bucket(s) ({', '.join(small[:5])}"
            f"{', ...' if len(small) > 5 else ''}) hold fewer samples than one batch of {train.batch_size}: "
            "their batches repeat samples (a larger data.bucket_step makes fewer buckets)")
    return notes


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def log_sampling(config: Any, events: EventLog, console: Console) -> None:
    """A step-distilled base (sampling.py): how validation samples it, and a warning where the
    method fine-tunes every denoiser weight with the diffusion loss, which undoes the
    distillation (the base then needs many steps again)."""
    from difftune.sampling import read_base_sampling

    sampling = read_base_sampling(config.model.pretrained, config.model.revision)
    if not sampling.distilled:
        return
    validation = config.validation
    line = (f"sampling: the base is {sampling.describe()}: validation samples with "
            f"{validation.scheduler or 'the family sampler'}, {validation.steps} step(s) at guidance "
            f"{validation.guidance_scale:g} (validation.scheduler, steps and guidance_scale set them)")
    warning = None
    if config.method.trains_every_weight:
        warning = (f"method {config.method.kind!r} trains every denoiser weight of a step-distilled base with the "
                   "plain diffusion loss, which undoes its few-step sampling (validation at "
                   f"{validation.steps} step(s) will show it). To keep it, train adapters instead ([method.lora], "
                   "or method.kind = \"lora\").")
    events.write("sampling", distilled=sampling.kind, scheduler=validation.scheduler, steps=validation.steps,
                 guidance_scale=validation.guidance_scale, warning=warning)
    console.print(line, highlight=False, soft_wrap=True)
    if warning is not None:
        console.print(f"warning: {warning}", highlight=False, soft_wrap=True)


def log_cache_choice(notes: tuple[str, ...], events: EventLog, console: Console) -> None:
    """How the caches left unset were chosen (training/cache_choice.py), one line each."""
    if not notes:
        return
    events.write("cache_choice", notes=list(notes))
    for note in notes:
        console.print(f"cache: {note}", highlight=False, soft_wrap=True)
