"""Run `difftune train CONFIG` in this process, with a fault injected (tests/test_faults.py,
tests/test_fault_lost.py).

    python tests/fault_child.py CONFIG kill-during-save STEP
        SIGKILL this process half-way through writing the step-STEP checkpoint: after
        accelerate has written its files into the staging folder, before the marker.
    python tests/fault_child.py CONFIG kill-during-final 0
        SIGKILL this process once final/'s weights are written into its staging folder,
        before it is published.
"""

import os
import signal
import sys

from difftune import files
from difftune.cli import main
from difftune.training import checkpoint


def kill_during_save(step: int) -> None:
    real = checkpoint._fsync_tree

    def fsync_then_die(root):
        real(root)
        if root.name == f".{checkpoint.PREFIX}{step:06d}.partial":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._fsync_tree = fsync_then_die


def kill_during_final() -> None:
    real = files.fsync_tree

    def fsync_then_die(root):
        real(root)
        if root.name == ".final.partial":
            os.kill(os.getpid(), signal.SIGKILL)

    files.fsync_tree = fsync_then_die


if __name__ == "__main__":
    config, fault, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if fault == "kill-during-save":
        kill_during_save(step)
    elif fault == "kill-during-final":
        kill_during_final()
    else:
        raise SystemExit(f"unknown fault {fault}")
    sys.exit(main(["train", config]))
