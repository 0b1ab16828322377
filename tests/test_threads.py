"""train.cpu_threads = "auto": torch's threads follow the cores other processes leave free."""

import os

import pytest
import torch

from difftune.training import threads as threads_module
from difftune.training.threads import ThreadGovernor


class Events:
    def __init__(self) -> None:
        self.written: list[dict] = []

    def write(self, event: str, **fields) -> None:
        self.written.append({"event": event, **fields})


def test_threads_give_way_to_a_busy_process_and_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads_module, "INTERVAL_S", 0.0)
    before = torch.get_num_threads()
    events = Events()
    governor = ThreadGovernor("auto", torch.device("cpu"), 1, events)
    governor.cores, governor.threads = 4, 4  # a 4-core machine, whatever this one has
    torch.set_num_threads(4)
    # (time, machine busy seconds, this process's seconds): another process takes 2 cores
    # for two readings, then a blip of 3 cores once, then nothing
    clock = iter([(10.0, 30.0, 10.0), (20.0, 60.0, 20.0), (30.0, 100.0, 30.0), (40.0, 130.0, 40.0),
                  (50.0, 140.0, 50.0), (60.0, 150.0, 60.0)])
    governor.last = (0.0, 0.0, 0.0)
    monkeypatch.setattr(governor, "_reading", lambda: next(clock))
    try:
        seen = []
        for step in range(1, 7):
            governor.after_step(step)
            seen.append(torch.get_num_threads())
        assert seen == [4, 2, 2, 2, 2, 4]  # two readings agree before a change; the blip is waited out
        assert [(e["step"], e["threads"], e["before"]) for e in events.written] == [(2, 2, 4), (6, 4, 2)]
        assert events.written[0]["other_processes_cores"] == 2.0
        with governor:  # the run ends with 4 threads
            pass
        # a later run in this process (the Python API, a test session) starts from the count it had
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_fixed_threads_and_launches_that_set_them_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert not ThreadGovernor(1, torch.device("cpu"), 1, Events()).active
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert not ThreadGovernor("auto", torch.device("cpu"), 1, Events()).active
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert not ThreadGovernor("auto", torch.device("cpu"), 2, Events()).active  # ranks would count each other
        assert ThreadGovernor("auto", torch.device("cpu"), 1, Events()).active == ("OMP_NUM_THREADS" not in os.environ)
    finally:
        torch.set_num_threads(before)
