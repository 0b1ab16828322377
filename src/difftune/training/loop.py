"""The training loop: one for every family and method; it never asks which one it runs."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from rich.console import Console

from difftune.config import RunConfig, to_toml
from difftune.data.cache import close_cache
from difftune.data.rows import data_identity
from difftune.families.base import check_weights_loaded
from difftune.processes import agreed, settle
from difftune.quiet import quiet_loading_bars
from difftune.report import write_report
from difftune.rundir import RunDir
from difftune.signals import StopSignals
from difftune.training import guards, setup
from difftune.training.checkpoint import (
    CONFIG_FILE,
    DATA_FILE,
    ENGINE_FILE,
    DiskSpaceError,
    ResumeError,
    TrainState,
    check_disk_space,
    checkpoint_bytes,
    checkpoint_dir,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
    store_trained_weights,
)
from difftune.training.ema import WeightAverage
from difftune.heap import keep_freed_memory
from difftune.training.final import attempt, keep_weights_and_raise, write_final
from difftune.training.engines import Engine
from difftune.training.events import (
    EventLog,
    LossWindow,
    Throughput,
    duration,
    peak_memory_mb,
    progress_bar,
    return_freed_memory,
    tracker_hyperparameters,
)
from difftune.training.guards import NonFiniteGuard, NonFiniteLoss, all_finite
from difftune.training.optim import make_lr_scheduler, make_optimizer, total_steps
from difftune.training.plan import RunPlan, finished_message, main_process_by_environment, plan_run
from difftune.training.step import Trainee
from difftune.training.stepping import OptimizerSteps
from difftune.training.summary import log_cache_choice, log_data_check, log_plan, log_sampling, start_summary
from difftune.training.threads import ThreadGovernor
from difftune.training.validate import Validation

logger = logging.getLogger(__name__)


class Run:
    """A training run in its run directory: set up once, then `fit`."""

    def __init__(self, config: RunConfig, console: Console | None = None, plan: RunPlan | None = None,
                 stop: StopSignals | None = None) -> None:
        self.console = console or Console(stderr=True, log_path=False)
        self.plan = plan or plan_run(config, main_process=main_process_by_environment())
        self.config = config = self.plan.config  # local paths made absolute
        self.run_dir = self.plan.run_dir
        checked = setup.preflight(config, self.plan.data)  # before any model loads
        self.resume_from = self.plan.resume_from
        self.accelerator: Accelerator = setup.make_accelerator(config)
        main = self.accelerator.is_main_process
        setup.write_run_config(config, self.accelerator)
        self.events = EventLog(self.run_dir, main)
        log_plan(self.plan, self.events, self.console, main)
        if main:
            log_cache_choice(checked.cache_notes, self.events, self.console)
            log_sampling(config, self.events, self.console)
            log_data_check(checked.samples, self.run_dir, self.events, self.console)
        self.events.write("heap", freed_memory=keep_freed_memory(config.train.keep_freed_memory))
        self.threads = ThreadGovernor(config.train.cpu_threads, self.accelerator.device,
                                      self.accelerator.num_processes, self.events)
        self.trainee = self._load_models(checked)
        self.nonfinite = NonFiniteGuard(config.train.max_nonfinite_steps)
        self.saved_step = -1  # the step of this process's last checkpoint
        self.stop = stop or StopSignals()
        self.validation = Validation(config, self.run_dir, checked.validation_pairs, checked.metric_set,
                                     self.accelerator, self.events, lambda: self.stop.requested,
                                     lambda line: self.console.print(line, highlight=False, soft_wrap=True))
        self.show: Any = lambda **fields: None  # the progress bar's update, while fit() runs
        trainee = self.trainee
        samples = trainee.method.training_data(trainee.family, trainee.parts, trainee.trained,
                                               checked.samples, self.accelerator)
        samples, self.offloaded = setup.encoded(samples, trainee, config, self.accelerator, self.events)
        self.cached = samples  # holds the cache contexts it reads until fit ends (data/cache.py)
        self.loader, self.sampler = setup.make_dataloader(samples, config, self.accelerator.num_processes,
                                                          self.accelerator.device, self.accelerator.process_index)
        self.streaming = config.data.streaming
        self.sample_count = len(samples)
        if hasattr(self.sampler, "summary"):
            self.events.write("buckets", samples_per_bucket=self.sampler.summary())
        self._prepare()
        self.events.write("engine", **self.engine.record(),
                          frozen_denoiser_sharded=self.engine.frozen_structure is not None)

    def _load_models(self, checked: setup.Preflight) -> Trainee:
        quiet_loading_bars()
        parts = checked.family.load(self.config.model, setup.denoiser_in_memory(self.config, self.accelerator))
        check_weights_loaded(parts.modules(), f"model.pretrained {self.config.model.pretrained!r}")
        parts = setup.with_sampler(parts, self.config)
        trained = checked.method.build(checked.family, parts)
        check_weights_loaded(trained, "the trained modules (method.controlnet?)")
        setup.place_frozen_parts(parts, self.accelerator)
        self.engine = Engine(self.accelerator)
        setup.apply_model_options(self.config, parts, trained, self.engine.sharded)
        setup.quantize_frozen(self.config, parts, self.accelerator, self.engine.sharded, self.events)
        self.engine.shard_frozen_denoiser(parts, trained)
        objective = checked.family.objective(parts, self.config.objective)
        return Trainee(checked.family, parts, checked.method, objective, trained)

    def _prepare(self) -> None:
        train, processes = self.config.train, self.accelerator.num_processes
        trainee = self.trainee
        names = list(trainee.trained)
        self.engine.before_prepare(trainee.trained, trainee.parts.denoiser)
        params = [p for m in trainee.trained.values() for p in m.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, train, processes)
        self.global_batch = train.batch_size * processes
        batches = self.sampler.padded // self.global_batch
        self.max_steps = total_steps(train, batches)
        schedule = make_lr_scheduler(optimizer, train, self.max_steps, processes)
        if self.streaming:  # each process reads its own share: accelerate must not split it again
            *modules, self.optimizer, self.schedule = self.accelerator.prepare(
                *trainee.trained.values(), optimizer, schedule)
            self.loader = setup.OnDevice(self.loader, self.accelerator.device)
        else:
            *modules, self.optimizer, self.loader, self.schedule = self.accelerator.prepare(
                *trainee.trained.values(), optimizer, self.loader, schedule)
        trainee.trained = dict(zip(names, modules))
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        # FSDP2's clipping needs a prepared model's whole parameter list to see it is sharded
        self.clipped = list(modules[0].parameters()) if self.engine.sharded else self.params
        if not self.engine.sharded:  # sharded state is saved by accelerate itself, by every rank
            store_trained_weights(self.accelerator, trainee.method, names)
        trainee.step_parts = trainee.parts.with_modules(trainee.trained)
        ema = self.config.method.ema
        self.ema = WeightAverage(trainee.trained, ema) if ema is not None else None
        # Saved beside the weights as safetensors (training.checkpoint), not as accelerate's
        # custom-state pickle, which load_state reads with weights_only=False.
        self.checkpointed = {"ema": self.ema} if self.ema is not None else {}
        self.steps = OptimizerSteps(train, self.accelerator, trainee, self.optimizer, self.schedule, self.clipped,
                                    self.nonfinite, self.ema, self.events)
        self.samples_per_epoch = self.sampler.padded
        self.samples_per_step = train.batch_size * train.gradient_accumulation_steps * processes

    def fit(self) -> Path | None:
        """Train to max_steps (continuing from a checkpoint if there is one); return final/,
        or None when a stop signal ended the run early (after a checkpoint). A stop signal
        during the last validation ends it there: final/ is written by then."""
        state = self._restore()
        main = self.accelerator.is_main_process
        if main:
            self.accelerator.init_trackers(self.config.train.tracker_project_name,
                                           config=tracker_hyperparameters(self.config))
        summary = start_summary(self, state.step)
        self.events.write("start", step=state.step, max_steps=self.max_steps,
                          resumed_from=str(self.resume_from) if self.resume_from else None, summary=summary)
        if main:
            self.console.print("\n".join(summary), highlight=False, soft_wrap=True)
        with self.stop:
            finished = False
            if self.stop.requested:  # during setup: nothing trained, nothing to save
                self.events.write("stopped", step=state.step, reason=self.stop.signal_name, during="setup")
            else:
                with progress_bar(self.console, main, self.config.train.log_every) as bar, self.threads:
                    task = bar.add_task("train", total=self.max_steps, completed=state.step, loss="-",
                                        rate=0.0, eta="", status="")
                    self.show = lambda **kw: bar.update(task, **kw)
                    finished = self._train(state)
                self.show = lambda **kw: None
            if finished:  # NoStepTrained when every step was skipped: final/ would be the starting weights
                guards.log_skipped_steps(self.nonfinite, self.events, self.console, main)
            final = self._finish(state) if finished else None
        settle(self.accelerator)  # before end_training tears the process group down
        self.accelerator.end_training()
        close_cache(self.cached)  # `difftune cache clear` may remove them now
        return final

    def _restore(self) -> TrainState:
        if self.accelerator.is_main_process:
            remove_partial_checkpoints(self.run_dir)
        if self.resume_from is None:
            return TrainState()
        state = load_checkpoint(self.accelerator, self.resume_from, self.engine.record(), self.checkpointed)
        if state.step > self.max_steps:  # max_steps from epochs (training.plan checks train.max_steps)
            raise ResumeError(f"the run is at step {state.step} ({self.resume_from.name}), past the "
                              f"{self.max_steps} steps of train.epochs = {self.config.train.epochs}: raise "
                              "epochs to continue it, or give another train.output_dir for a new run")
        return state

    def _train(self, state: TrainState) -> bool:
        """Run optimizer steps to max_steps; False if a stop signal ended it early. A row
        that cannot be trained on stops it too (BadRowStop, on every process at the same
        batch), after a checkpoint of its last finished optimizer step."""
        self.stepped = guards.StepMark(state, self.accelerator)  # the last finished step
        if self.resume_from is not None:
            self.saved_step = state.step  # its checkpoint holds this step
        try:
            return self._steps(state)
        except guards.BadRowStop as stop:
            state = self.stepped.restore()
            self._stop(state, problem=str(stop))
            raise stop.kept_at(state.step) from None

    def _steps(self, state: TrainState) -> bool:
        clock, losses = Throughput(), LossWindow()
        while state.step < self.max_steps:
            if state.samples_in_epoch >= self.samples_per_epoch:
                state.epoch, state.samples_in_epoch = state.epoch + 1, 0
            self.sampler.start_epoch(state.epoch, state.samples_in_epoch)
            for batch in guards.batches_until_a_bad_row(self.loader, self.accelerator):
                loss = self.steps.micro_step(batch, state)
                state.samples_in_epoch += self.global_batch
                if not self.accelerator.sync_gradients:
                    continue
                state.step += 1
                self.stepped = guards.StepMark(state, self.accelerator)
                self.threads.after_step(state.step)
                stopping = agreed(self.accelerator, self.stop.requested)
                self._after_step(state, loss, clock, losses, validate=not stopping)
                if stopping:
                    self._stop(state)
                    return False
                if state.step >= self.max_steps:
                    return True
            state.samples_in_epoch = self.samples_per_epoch
        return True

    def _stop(self, state: TrainState, problem: str | None = None) -> None:
        """A stop signal, or a row that cannot be trained on (`problem`, which the caller
        raises): keep the work (a checkpoint at this step, if it trained any) and leave."""
        if self.saved_step != state.step and state.step > 0:
            self._checkpoint(state)
        self.events.write("stopped", step=state.step, reason="bad data" if problem else self.stop.signal_name,
                          **({"problem": problem} if problem else {}))
        if problem is None:
            self.console.log(f"stopped at step {state.step}; run the same command again to resume")

    def _after_step(
        self, state: TrainState, loss: float, clock: Throughput, losses: LossWindow, validate: bool = True
    ) -> None:
        rate = clock.update(self.samples_per_step)
        eta = clock.eta(self.max_steps - state.step)
        mean = losses.add(loss)
        self.show(advance=1, loss=f"{mean:.4f}" if math.isfinite(mean) else "-", rate=rate, eta=duration(eta))
        if state.step % self.config.train.log_every == 0 or state.step == self.max_steps:
            lr = self.schedule.get_last_lr()[0]
            self.accelerator.log({"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate}, step=state.step)
            self.events.write("step", step=state.step, epoch=state.epoch, loss=loss, lr=lr,
                              samples_per_s=round(rate, 3), eta_s=round(eta, 1),
                              peak_memory_mb=round(peak_memory_mb(self.accelerator.device), 1))
        # The checkpoint first: a validation that fails (or is stopped) never costs saved work.
        if state.step % self.config.train.checkpoint_every == 0:
            self._checkpoint(state)
        if validate and state.step % self.config.validation.every == 0 and state.step < self.max_steps:
            self._validate(state.step)
        clock.restart()

    def _checkpoint(self, state: TrainState) -> None:
        if not self._finite():
            raise NonFiniteLoss(f"step {state.step}: the weights are not finite; not saving them")
        self._require_disk_space(state.step)
        started = time.perf_counter()
        self.show(status="saving a checkpoint")
        records = {CONFIG_FILE: to_toml(self.config),
                   ENGINE_FILE: json.dumps(self.engine.record())}
        if self.plan.data is not None:
            records[DATA_FILE] = json.dumps(data_identity(self.plan.data))
        path = save_checkpoint(self.accelerator, self.run_dir, state, self.config.train.checkpoints_total_limit,
                               records, self.checkpointed)
        self.show(status="")
        self.saved_step = state.step
        self.events.write("checkpoint", path=str(path),
                          seconds=round(time.perf_counter() - started, 2), **asdict(state))

    def _require_disk_space(self, step: int, what: str = "") -> None:
        """Stop before a save that cannot fit (the step's checkpoint, or `what`: "final/",
        which holds at least the trained weights in fp32), on every rank together (not
        half-way through writing, and not with some ranks waiting in save_state)."""
        problem = None
        if self.accelerator.is_main_process:
            trained = sum(p.numel() for p in self.params)
            needed = trained * 4 + 10 * 2**20 if what else checkpoint_bytes(self.run_dir, trained)
            problem = check_disk_space(self.run_dir, needed, step, what)
        if agreed(self.accelerator, problem is not None):
            self.events.write("disk_full", step=step, message=problem)
            raise DiskSpaceError(problem or f"not enough disk space on the main process for {what or 'a checkpoint'}")

    def _validate(self, step: int) -> None:
        if not self.validation.wanted:
            return
        with self._averaged():
            # every rank takes part when sharded (gathering is a collective)
            trained = self._whole_modules()
            parts = self.engine.whole_parts(self.trainee.parts, self.trainee.family.denoiser_name)
            if self.accelerator.is_main_process:
                with self.offloaded.on_device():
                    self.validation.at_step(step, self.trainee, parts, trained, self.show)
            del trained, parts
        # Everyone waits for the main process here, never inside its generation.
        self.accelerator.wait_for_everyone()

    def _whole_modules(self) -> dict[str, torch.nn.Module]:
        """The trained modules whole, for the main process (a collective when sharded)."""
        return self.engine.whole_modules(self.trainee.trained)

    def _finite(self) -> bool:
        """Every rank's weights finite (each checks its own shards when sharded)."""
        local = all(all_finite(module) for module in self.trainee.trained.values())
        return not agreed(self.accelerator, not local)

    def _averaged(self) -> Any:
        """The EMA weights swapped in (validation and export see them), if there is an EMA."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _finish(self, state: TrainState) -> Path:
        """final/ (written whole or not at all; a final/ from a shorter run before it is kept
        as final-step-N), then the last validation and the report."""
        final = RunDir(self.run_dir).final
        self.accelerator.wait_for_everyone()
        if not self._finite():
            raise NonFiniteLoss(f"step {state.step}: the weights are not finite; final/ not written")
        self._release_training_state()
        self._require_disk_space(state.step, "final/")
        with self._averaged():
            # Only trained modules are saved: a denoiser FSDP2 shards as a frozen part (a
            # ControlNet's UNet) is not gathered for it.
            trained = self._whole_modules()
            failure = None
            if self.accelerator.is_main_process:
                failure = attempt(lambda: self._save_final(self.trainee.parts, trained, state.step))
                if failure is None:
                    self.events.write("final", step=state.step, path=str(final), ema=self.ema is not None)
            del trained
        if agreed(self.accelerator, failure is not None):  # the weights kept in a checkpoint first
            keep_weights_and_raise(failure, state.step, checkpoint_dir(self.run_dir, state.step),
                                   self.saved_step == state.step, lambda: self._checkpoint(state), self.events)
        self._validate(state.step)
        if self.accelerator.is_main_process:
            if self.stop.requested:
                self.events.write("stopped", step=state.step, reason=self.stop.signal_name, during="final validation")
                self.console.log("stopped during the last validation; final/ was written before it")
            write_report(self.run_dir, self.config)
        self.accelerator.wait_for_everyone()
        return final

    def _save_final(self, parts: Any, trained: dict[str, torch.nn.Module], step: int) -> None:
        trainee = self.trainee
        write_final(self.run_dir, step, lambda out: trainee.method.save(trainee.family, parts, trained, out))

    def _release_training_state(self) -> None:
        """Training is over (a checkpoint, if one was due, is written): free gradients and
        optimizer state before final/ is saved and validation generates. For an SD1.5
        ControlNet in fp32 that is 4.3 GB, and saving would otherwise peak above it."""
        self.optimizer.zero_grad(set_to_none=True)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        inner.state.clear()
        return_freed_memory()


def train(config: RunConfig, console: Console | None = None, plan: RunPlan | None = None) -> Path | None:
    """Train the run; its final/ folder, or None when a stop signal ended it early. A run
    that finished before is not trained again (its final/ is returned)."""
    plan = plan or plan_run(config, main_process=main_process_by_environment())
    if plan.finished_at is not None:
        logger.warning(finished_message(plan))
        return RunDir(plan.run_dir).final
    with StopSignals() as stop:  # from before the models load
        return Run(plan.config, console, plan, stop).fit()
