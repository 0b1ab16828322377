"""Wall time, peak RSS and peak GPU memory of a command's whole process tree."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB of GPU memory per process, as nvidia-smi reports it."""
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    lines = subprocess.run(query, capture_output=True, text=True, check=False).stdout.splitlines()
    used = {}
    for line in lines:
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            used[int(pid)] = int(mib)
    return used


def measure(command: list[str], cwd: Path, gpu: bool = False) -> dict:
    """Wall time, peak RSS and (gpu) peak GPU memory of one command's process tree;
    fails loudly."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "gpu_mib": 0}

    def sample() -> None:
        try:
            root = psutil.Process(process.pid)
            while process.poll() is None:
                tree = [root, *root.children(recursive=True)]
                rss = 0
                for member in tree:
                    try:
                        rss += member.memory_info().rss
                    except psutil.Error:
                        pass
                peak["rss"] = max(peak["rss"], rss)
                if gpu:  # nvidia-smi takes ~20 ms itself
                    pids = {member.pid for member in tree}
                    used = sum(mib for pid, mib in gpu_memory_by_pid().items() if pid in pids)
                    peak["gpu_mib"] = max(peak["gpu_mib"], used)
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
    result = {"seconds": seconds, "peak_rss_mb": peak["rss"] / 2**20}
    if gpu:
        result["peak_gpu_mib"] = peak["gpu_mib"]
    return result
