"""Decisions every process of a launch takes together: one rank's NaN, full disk or stop
signal must send every rank down the same branch, or the others wait forever."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator


def agreed(accelerator: Accelerator, flag: bool) -> bool:
    """True when the flag is set on any process, so every rank takes the same branch."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def settle(accelerator: Accelerator) -> None:
    """The last step of a multi-process run, before anything can free the process group.

    gloo's worker thread frees each finished collective itself, and freeing one that holds
    a tensor made in Python takes the GIL. When the process group is torn down right after
    the last barrier, the main thread holds the GIL while it joins that worker: a deadlock
    at exit (a 2-process CPU job hung 1 run in 3). A last barrier, then a pause that gives
    up the GIL, lets the worker finish first."""
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        time.sleep(0.2)
