"""The training loop: one for every family and method; it never asks which one it runs."""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from difftune.config import RunConfig
from difftune.data.cache import Processes, build_cache, default_cache_dir
from difftune.data.check import write_report as write_data_report
from difftune.objectives import DiscreteDiffusion
from difftune.report import write_report
from difftune.scoring import score_control
from difftune.training import setup
from difftune.training.checkpoint import (
    DiskSpaceError,
    TrainState,
    check_disk_space,
    checkpoint_bytes,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
    store_trained_weights,
)
from difftune.training.ema import WeightAverage
from difftune.training.events import EventLog, Throughput, peak_memory_mb, progress_bar
from difftune.training.guards import NonFiniteGuard, NonFiniteLoss, StopSignals, agreed, all_finite
from difftune.training.optim import make_lr_scheduler, make_optimizer, total_steps
from difftune.training.step import Trainee, training_loss
from difftune.validation import ValidationPair, log_to_trackers, run_validation


class Run:
    """A training run in its run directory: set up once, then `fit`."""

    def __init__(self, config: RunConfig, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console(stderr=True)
        self.run_dir = Path(config.train.output_dir)
        checked = setup.preflight(config)  # before any model loads
        self.validation_pairs: list[ValidationPair] = checked.validation_pairs
        self.metric_set = checked.metric_set
        self.floor: dict[str, float] | None = None
        self.resume_from = checked.resume_from
        self.accelerator: Accelerator = setup.make_accelerator(config)
        setup.write_run_config(config, self.accelerator)
        self.events = EventLog(self.run_dir, self.accelerator.is_main_process)
        self._log_data_check(checked.samples)
        self.trainee = self._load_models(checked)
        self.nonfinite = NonFiniteGuard(config.train.max_nonfinite_steps)
        self.window_bad = False  # a non-finite loss in the current accumulation window
        self.saved_step = -1  # the step of this process's last checkpoint
        self.stop = StopSignals()
        trainee = self.trainee
        samples = trainee.method.training_data(trainee.family, trainee.parts, trainee.trained,
                                               checked.samples, self.accelerator)
        samples = self._encoded(samples)
        self.loader, self.sampler = setup.make_dataloader(samples, config, self.accelerator.num_processes,
                                                          self.accelerator.device)
        if hasattr(self.sampler, "summary"):
            self.events.write("buckets", samples_per_bucket=self.sampler.summary())
        self._prepare()

    def _log_data_check(self, samples: Any) -> None:
        """The pre-training data check in the run directory (data-check.json) and events:
        every skipped row by file and reason, and the notes (conversions, upscaling)."""
        report = samples.report
        if report is None or not self.accelerator.is_main_process:
            return
        write_data_report(report, self.run_dir / "data-check.json")
        skipped = [asdict(f) for f in report.findings if f.fatal]
        self.events.write("data_check", rows=report.rows, trained_rows=len(samples),
                          skipped_rows=report.bad_rows(), counts=report.counts(), skipped=skipped)
        if skipped:
            self.console.log(f"data: skipping {len(report.bad_rows())} bad row(s) of {report.rows} "
                             f"(data.on_bad = \"skip\"); each is listed in {self.run_dir / 'data-check.json'}")
        notes = Counter(f.kind for f in report.findings if not f.fatal)
        if notes:
            described = ", ".join(f"{kind} {n}" for kind, n in notes.items())
            self.console.log(f"data notes ({described}): see {self.run_dir / 'data-check.json'}")

    def _encoded(self, samples: Any) -> Any:
        """With data.cache_latents / cache_text: encode what the cache lacks once, train
        from the cache, and take the frozen encoders it replaces off the accelerator."""
        data, trainee = self.config.data, self.trainee
        self.offloaded: list[torch.nn.Module] = []
        if not (data.cache_latents or data.cache_text):
            return samples
        folder = Path(data.encoded_cache_dir).expanduser() if data.encoded_cache_dir else default_cache_dir()
        started = time.perf_counter()
        accelerator = self.accelerator
        processes = Processes(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
                              lambda flag: agreed(accelerator, flag))
        encoded, stats = build_cache(samples, trainee.family, trainee.parts, data.cache_latents, data.cache_text,
                                     folder, self.config.train.batch_size, processes)
        self.events.write("cache", path=str(folder), seconds=round(time.perf_counter() - started, 2), **stats)
        if self.accelerator.device.type != "cpu":
            cached = [(data.cache_latents, trainee.parts.vae), (data.cache_text, trainee.parts.text_encoder)]
            self.offloaded = [module.to("cpu") for done, module in cached if done]
        return encoded

    @contextlib.contextmanager
    def _encoders_on_device(self) -> Any:
        """Validation generates with the whole pipeline: offloaded encoders come back for it."""
        for module in self.offloaded:
            module.to(self.accelerator.device)
        try:
            yield
        finally:
            for module in self.offloaded:
                module.to("cpu")

    def _load_models(self, checked: setup.Preflight) -> Trainee:
        parts = checked.family.load(self.config.model, setup.denoiser_in_memory(self.config, self.accelerator))
        trained = checked.method.build(checked.family, parts)
        setup.place_frozen_parts(parts, self.accelerator)
        setup.apply_model_options(self.config, parts, trained)
        objective = DiscreteDiffusion(parts.noise_scheduler, self.config.objective)
        return Trainee(checked.family, parts, checked.method, objective, trained)

    def _prepare(self) -> None:
        train, processes = self.config.train, self.accelerator.num_processes
        trainee = self.trainee
        params = [p for m in trainee.trained.values() for p in m.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, train, processes)
        self.global_batch = train.batch_size * processes
        batches = self.sampler.padded // self.global_batch
        self.max_steps = total_steps(train, batches)
        schedule = make_lr_scheduler(optimizer, train, self.max_steps, processes)
        names = list(trainee.trained)
        *modules, self.optimizer, self.loader, self.schedule = self.accelerator.prepare(
            *trainee.trained.values(), optimizer, self.loader, schedule
        )
        trainee.trained = dict(zip(names, modules))
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        store_trained_weights(self.accelerator, trainee.method, names)
        trainee.step_parts = trainee.method.training_parts(trainee.parts, trainee.trained)
        ema = self.config.method.ema
        self.ema = WeightAverage(trainee.trained, ema) if ema is not None else None
        if self.ema is not None:
            self.accelerator.register_for_checkpointing(self.ema)
        self.samples_per_epoch = self.sampler.padded
        self.samples_per_step = train.batch_size * train.gradient_accumulation_steps * processes

    def fit(self) -> Path | None:
        """Train to max_steps (continuing from a checkpoint if there is one); return final/,
        or None when a stop signal ended the run early (after a checkpoint)."""
        state = self._restore()
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers(self.config.train.tracker_project_name, config=_flat(self.config))
        self.events.write("start", step=state.step, max_steps=self.max_steps,
                          resumed_from=str(self.resume_from) if self.resume_from else None)
        with StopSignals() as self.stop, progress_bar(self.console, self.accelerator.is_main_process) as bar:
            task = bar.add_task("train", total=self.max_steps, completed=state.step, loss=0.0, rate=0.0)
            finished = self._train(state, lambda **kw: bar.update(task, **kw))
        final = self._finish(state) if finished else None
        self.accelerator.end_training()
        return final

    def _restore(self) -> TrainState:
        if self.accelerator.is_main_process:
            remove_partial_checkpoints(self.run_dir)
        if self.resume_from is None:
            return TrainState()
        state = load_checkpoint(self.accelerator, self.resume_from)
        self.console.log(f"resuming from {self.resume_from} at step {state.step}")
        return state

    def _train(self, state: TrainState, show: Any) -> bool:
        """Run optimizer steps to max_steps; False if a stop signal ended it early."""
        clock = Throughput()
        while state.step < self.max_steps:
            if state.samples_in_epoch >= self.samples_per_epoch:
                state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            self.sampler.start_epoch(state.epoch, state.samples_in_epoch)
            for batch in self.loader:
                loss = self._micro_step(batch, state)
                state.samples_in_epoch += self.global_batch
                if not self.accelerator.sync_gradients:
                    continue
                state.step += 1
                stopping = agreed(self.accelerator, self.stop.requested)
                self._after_step(state, loss, clock, show, validate=not stopping)
                if stopping:
                    self._stop(state)
                    return False
                if state.step >= self.max_steps:
                    return True
            state.samples_in_epoch = self.samples_per_epoch
        return True

    def _micro_step(self, batch: dict[str, Any], state: TrainState) -> float:
        """Forward and backward; on the window's last micro-batch, the optimizer step.
        A non-finite loss anywhere in the accumulation window skips that whole step."""
        train, accelerator = self.config.train, self.accelerator
        with accelerator.accumulate(*self.trainee.trained.values()):
            loss = training_loss(self.trainee, batch, train.seed)
            finite = not agreed(accelerator, not bool(torch.isfinite(loss.detach()).all()))
            if finite:
                accelerator.backward(loss)
            self.window_bad |= not finite
            if accelerator.sync_gradients:
                self._optimizer_step(state)
                self.window_bad = False
            else:
                self.schedule.step()  # as accelerate expects on every micro-batch
        return accelerator.reduce(loss.detach(), reduction="mean").item() if finite else float("nan")

    def _optimizer_step(self, state: TrainState) -> None:
        """Clip and step, unless the window's loss or gradient norm was not finite: then
        the gradients are dropped, the step is skipped and counted."""
        train, accelerator = self.config.train, self.accelerator
        good = not self.window_bad
        if good:
            norm = accelerator.clip_grad_norm_(self.params, train.max_grad_norm)
            good = norm is None or not agreed(accelerator, not bool(torch.isfinite(norm).all()))
            if not good and accelerator.scaler is not None:
                self._gradient_overflow(state)  # fp16: the loss scale was too high
                return
        if good:
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=train.set_grads_to_none)
            self.nonfinite.good()
            if self.ema is not None:
                self.ema.after_step(state.step + 1)
            return
        # accelerate's zero_grad does nothing off a sync step; clear the real optimizer's
        self.optimizer.optimizer.zero_grad(set_to_none=True)
        self.events.write("nonfinite", step=state.step + 1, in_a_row=self.nonfinite.in_a_row + 1,
                          total=self.nonfinite.total + 1)
        self.nonfinite.bad()

    def _gradient_overflow(self, state: TrainState) -> None:
        """fp16's loss scale overflowed (a finite loss, inf gradients after unscaling).
        The scaler's own step skips the update and lowers the scale; without it the
        scaler would never update and the next unscale would fail. This is normal early
        in fp16 training, so it is logged but not counted as a non-finite step."""
        self.optimizer.step()  # GradScaler: skipped, scale lowered
        self.schedule.step()  # accelerate skips it too when the optimizer step was skipped
        self.optimizer.zero_grad(set_to_none=self.config.train.set_grads_to_none)
        self.events.write("overflow", step=state.step + 1, scale=float(self.accelerator.scaler.get_scale()))

    def _stop(self, state: TrainState) -> None:
        """A stop signal: keep the work (a checkpoint at this step) and leave cleanly."""
        if self.saved_step != state.step:
            self._checkpoint(state)
        self.events.write("stopped", step=state.step, reason="signal")
        self.console.log(f"stopped at step {state.step}; run the same command again to resume")

    def _after_step(
        self, state: TrainState, loss: float, clock: Throughput, show: Any, validate: bool = True
    ) -> None:
        rate = clock.update(self.samples_per_step)
        show(advance=1, loss=loss, rate=rate)
        if state.step % self.config.train.log_every == 0 or state.step == self.max_steps:
            lr = self.schedule.get_last_lr()[0]
            eta = (self.max_steps - state.step) * self.samples_per_step / max(rate, 1e-9)
            self.accelerator.log({"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate}, step=state.step)
            self.events.write("step", step=state.step, epoch=state.epoch, loss=loss, lr=lr,
                              samples_per_s=round(rate, 3), eta_s=round(eta, 1),
                              peak_memory_mb=round(peak_memory_mb(self.accelerator.device), 1))
        if validate and state.step % self.config.validation.every == 0 and state.step < self.max_steps:
            self._validate(state.step)
        if state.step % self.config.train.checkpoint_every == 0:
            self._checkpoint(state)
        clock.restart()

    def _checkpoint(self, state: TrainState) -> None:
        if not self._finite():
            raise NonFiniteLoss(f"step {state.step}: the weights are not finite; not saving them")
        self._check_disk_space(state.step)
        started = time.perf_counter()
        path = save_checkpoint(self.accelerator, self.run_dir, state,
                               self.config.train.checkpoints_total_limit)
        self.saved_step = state.step
        self.events.write("checkpoint", path=str(path),
                          seconds=round(time.perf_counter() - started, 2), **asdict(state))

    def _check_disk_space(self, step: int) -> None:
        """Stop before a save that cannot fit, on every rank together (not half-way
        through writing, and not with some ranks waiting in save_state)."""
        problem = None
        if self.accelerator.is_main_process:
            needed = checkpoint_bytes(self.run_dir, sum(p.numel() for p in self.params))
            problem = check_disk_space(self.run_dir, needed, step)
        if agreed(self.accelerator, problem is not None):
            self.events.write("disk_full", step=step, message=problem)
            raise DiskSpaceError(problem or "not enough disk space on the main process for a checkpoint")

    def _validate(self, step: int) -> None:
        if not self.validation_pairs and self.metric_set is None:
            return
        if self.accelerator.is_main_process:
            started = time.perf_counter()
            out_dir = self.run_dir / "validation" / f"step-{step:06d}"
            trainee, trained = self.trainee, self._unwrapped()
            with self._averaged(), self._encoders_on_device():
                results = run_validation(trainee.family, trainee.parts, trainee.method,
                                         trained, self.validation_pairs, self.config, out_dir)
                scores = self._score(trained, out_dir, step)
            log_to_trackers(self.accelerator.trackers, results, step)
            self.events.write("validation", step=step, path=str(out_dir), pairs=len(results),
                              seconds=round(time.perf_counter() - started, 2), **scores)
            write_report(self.run_dir, f"{trainee.method.name} - {self.run_dir.name}")
        # Everyone waits for the main process here, never inside its generation.
        self.accelerator.wait_for_everyone()

    def _unwrapped(self) -> dict[str, torch.nn.Module]:
        return {name: self.accelerator.unwrap_model(m) for name, m in self.trainee.trained.items()}

    def _finite(self) -> bool:
        return all(all_finite(module) for module in self.trainee.trained.values())

    def _averaged(self) -> Any:
        """The EMA weights swapped in (validation and export see them), if there is an EMA."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _score(self, trained: dict[str, torch.nn.Module], out_dir: Path, step: int) -> dict[str, Any]:
        """Control metric on the held-out set, and once per run its floor (control off)."""
        if self.metric_set is None:
            return {}
        trainee, floor_settings = self.trainee, self.trainee.method.floor_settings
        args = (trainee.family, trainee.parts, trainee.method, trained, self.metric_set, self.config)
        metrics = score_control(*args, out_dir)
        if self.floor is None and floor_settings is not None:
            self.floor = score_control(*args, self.run_dir / "validation" / "floor", floor_settings)
        logged = {f"validation/{k}": v for k, v in metrics.items()}
        logged |= {f"validation/floor_{k}": v for k, v in (self.floor or {}).items()}
        self.accelerator.log(logged, step=step)
        return {"metrics": metrics, "floor": self.floor}

    def _finish(self, state: TrainState) -> Path:
        final = self.run_dir / "final"
        self.accelerator.wait_for_everyone()
        if not self._finite():
            raise NonFiniteLoss(f"step {state.step}: the weights are not finite; final/ not written")
        self._release_training_state()
        if self.accelerator.is_main_process:
            with self._averaged():
                self.trainee.method.save(self.trainee.family, self.trainee.parts, self._unwrapped(), final)
            self.events.write("final", step=state.step, path=str(final), ema=self.ema is not None)
        self._validate(state.step)
        if self.accelerator.is_main_process:
            write_report(self.run_dir, f"{self.trainee.method.name} - {self.run_dir.name}")
        self.accelerator.wait_for_everyone()
        return final


    def _release_training_state(self) -> None:
        """Training is over (a checkpoint, if one was due, is written): free gradients and
        optimizer state before final/ is saved and validation generates. For an SD1.5
        ControlNet in fp32 that is 4.3 GB, and saving would otherwise peak above it."""
        self.optimizer.zero_grad(set_to_none=True)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        inner.state.clear()
        return_freed_memory()


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks of up to 32 MB in
    its heap (most of a UNet's tensors), so without this the resident size stays at its
    peak after the optimizer state is freed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _flat(config: RunConfig) -> dict[str, Any]:
    """Scalar hyperparameters for trackers (tensorboard stores no lists)."""
    flat = {}
    for section, values in config.model_dump().items():
        for key, value in values.items():
            if isinstance(value, (bool, int, float, str)):
                flat[f"{section}.{key}"] = value
    return flat


def train(config: RunConfig, console: Console | None = None) -> Path | None:
    return Run(config, console).fit()
