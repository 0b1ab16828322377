"""Run `difftune train CONFIG` in this process, with a fault injected (tests/test_faults.py).

    python tests/fault_child.py CONFIG kill-during-save STEP
        SIGKILL this process half-way through writing the step-STEP checkpoint: after
        accelerate has written its files into the staging folder, before the marker.
"""

import os
import signal
import sys

from difftune.cli import main
from difftune.training import checkpoint


def kill_during_save(step: int) -> None:
    real = checkpoint._fsync_tree

    def fsync_then_die(root):
        real(root)
        if root.name == f".{checkpoint.PREFIX}{step:06d}.partial":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._fsync_tree = fsync_then_die


if __name__ == "__main__":
    config, fault, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert fault == "kill-during-save"
    kill_during_save(step)
    sys.exit(main(["train", config]))
