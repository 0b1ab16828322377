"""Two CPU processes (gloo) through torchrun: one job, rank 0 writes, both ranks save state."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import run_config
from difftune.config import build_config, to_toml


def test_two_process_run(tiny_base: Path, circles: Path, held_out: Path, tmp_path: Path) -> None:
    raw = run_config(tiny_base, circles, tmp_path / "run", held_out, train={"max_steps": 2})
    config = tmp_path / "c.toml"
    config.write_text(to_toml(build_config(raw)))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "difftune", "train", str(config)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1  # only rank 0 writes
    assert [e["event"] for e in events].count("validation") == 1  # the final one
    assert done.stderr.count("done:") == 1
