"""Optimizer and learning-rate schedule, as diffusers' training scripts build them."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from difftune.config import TrainConfig
from difftune.extras import require_bitsandbytes


def learning_rate(config: TrainConfig, num_processes: int) -> float:
    if not config.scale_lr:
        return config.learning_rate
    return (
        config.learning_rate
        * config.gradient_accumulation_steps
        * config.batch_size
        * num_processes
    )


def make_optimizer(
    parameters: list[torch.nn.Parameter], config: TrainConfig, num_processes: int
) -> torch.optim.Optimizer:
    settings = {
        "lr": learning_rate(config, num_processes),
        "betas": (config.adam_beta1, config.adam_beta2),
        "weight_decay": config.adam_weight_decay,
        "eps": config.adam_epsilon,
    }
    if config.use_8bit_adam:
        return require_bitsandbytes().optim.AdamW8bit(parameters, **settings)
    try:
        # One fused kernel for all parameters (CPU and CUDA): on the tiny benchmark the
        # per-tensor loop diffusers' scripts get cost ~6 ms a step.
        return torch.optim.AdamW(parameters, fused=True, **settings)
    except RuntimeError:
        return torch.optim.AdamW(parameters, foreach=True, **settings)


def steps_per_epoch(batches_per_epoch: int, accumulation: int) -> int:
    return math.ceil(batches_per_epoch / accumulation)


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return config.epochs * steps_per_epoch(batches_per_epoch, config.gradient_accumulation_steps)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, max_steps: int, num_processes: int
) -> Any:
    # An accelerate-prepared scheduler steps once per process per optimizer step, so
    # warmup and length are counted in process-steps (diffusers PR #8312).
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
