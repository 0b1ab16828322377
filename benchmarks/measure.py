"""Wall time, peak RSS and peak GPU memory of a command's whole process tree."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB of GPU memory per process, as nvidia-smi reports it (host PIDs: inside a
    container without the host's PID namespace, none match)."""
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    used = {}
    for line in _nvidia_smi(query):
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            used[int(pid)] = int(mib)
    return used


def gpu_memory_used() -> int:
    """MiB in use on all GPUs together."""
    return sum(int(line) for line in _nvidia_smi(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]) if line.strip().isdigit())


def _nvidia_smi(query: list[str]) -> list[str]:
    return subprocess.run(query, capture_output=True, text=True, check=False).stdout.splitlines()


def measure(command: list[str], cwd: Path, gpu: bool = False, env: dict[str, str] | None = None) -> dict:
    """Wall time and peaks of one command's process tree; fails loudly.

    peak_rss_mb sums the resident sizes (a forked worker counts the pages it shares with
    its parent again); peak_pss_mb sums proportional sizes, which share them out (sampled
    every 5th time: reading it costs more). With gpu: the tree's GPU memory by PID, or,
    where nvidia-smi's PIDs are not this namespace's, the rise in used GPU memory over
    what was used before the command started (then nothing else may use the GPU).
    env: variables to set for the command, over this process's own."""
    baseline = gpu_memory_used() if gpu else 0
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **env} if env else None)
    peak = {"rss": 0, "pss": 0, "gpu_by_pid": 0, "gpu_rise": 0}

    def sample() -> None:
        count = 0
        try:
            root = psutil.Process(process.pid)
            while process.poll() is None:
                tree = [root, *root.children(recursive=True)]
                peak["rss"] = max(peak["rss"], _total(tree, lambda m: m.memory_info().rss))
                if count % 5 == 0:
                    peak["pss"] = max(peak["pss"], _total(tree, lambda m: m.memory_full_info().pss))
                if gpu:  # nvidia-smi takes ~20 ms itself
                    pids = {member.pid for member in tree}
                    by_pid = sum(mib for pid, mib in gpu_memory_by_pid().items() if pid in pids)
                    peak["gpu_by_pid"] = max(peak["gpu_by_pid"], by_pid)
                    peak["gpu_rise"] = max(peak["gpu_rise"], gpu_memory_used() - baseline)
                count += 1
                time.sleep(0.02)
        except psutil.Error:
            pass

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    output, _ = process.communicate()
    seconds = time.perf_counter() - started
    watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"failed ({process.returncode}): {' '.join(command)}\n{output[-4000:]}")
    result = {"seconds": seconds, "peak_rss_mb": peak["rss"] / 2**20, "peak_pss_mb": peak["pss"] / 2**20}
    if gpu:
        by_pid = peak["gpu_by_pid"] > 0
        result["peak_gpu_mib"] = peak["gpu_by_pid"] if by_pid else peak["gpu_rise"]
        result["gpu_memory_from"] = "process tree" if by_pid else "rise in used memory"
        if result["peak_gpu_mib"] == 0:
            raise SystemExit(f"no GPU memory seen for: {' '.join(command)}")
    return result


def _total(tree: list[psutil.Process], size: Any) -> int:
    total = 0
    for member in tree:
        try:
            total += size(member)
        except psutil.Error:
            pass
    return total
