"""Freed memory that stays with the process (glibc's malloc told to keep it), so a CPU
step does not pay the kernel to zero the same pages again on every step.

Why: glibc gives a large block (above its mmap threshold, at most 32 MB) its own mmap and
unmaps it when freed, and gives the top of its heap back once more than the trim threshold
is free. A training step frees and allocates the same large activations every time (the
Qwen-Image-Edit fill-circles preset, batch 16, allocates a 200 MB attention buffer), so
every step faults each page in again and the kernel clears it: on the 2-core benchmark box
40% of the CPU time was the kernel's (clear_page, page faults, munmap) and the preset ran
52 samples/s. With mmap off and the trim threshold at its maximum, freed blocks are reused
from the heap: 92 samples/s, the same losses to the last digit (benchmarks/heap/).

The cost is memory: the process keeps its peak heap until it exits, and a heap reused
without unmapping fragments (the same preset peaked at 13.6 GB against 10.3). Left alone:
another allocator preloaded (jemalloc, tcmalloc, mimalloc: LD_PRELOAD), malloc tuned by
the launch (any MALLOC_* variable or GLIBC_TUNABLES), a libc that is not glibc, and
train.keep_freed_memory = false (`difftune generate` honours the launch's settings only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Mapping

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
"""mallopt's parameter numbers (malloc.h)."""

LARGEST_TRIM_THRESHOLD = 2**31 - 1
"""mallopt takes an int: keep up to 2 GiB free at the heap's top before giving any back."""


def launch_tunes_malloc(environ: Mapping[str, str] = os.environ) -> str | None:
    """What in the environment already decides how memory is allocated, or None."""
    preload = environ.get("LD_PRELOAD", "")
    if "malloc" in preload:  # jemalloc, tcmalloc, mimalloc
        return f"LD_PRELOAD={preload}"
    for name in sorted(environ):
        if name.startswith("MALLOC_") or name == "GLIBC_TUNABLES":
            return name
    return None


def keep_freed_memory(enabled: bool = True) -> str:
    """Tell glibc's malloc to keep freed memory; return what was done, for the run's log."""
    if not enabled:
        return "off (train.keep_freed_memory = false)"
    tuned = launch_tunes_malloc()
    if tuned is not None:
        return f"left to the launch ({tuned})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: left alone"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success, 0 on a refused value
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD) != 1:
        return "glibc refused mallopt: left alone"
    return "kept (glibc: no mmap for large blocks, trim threshold 2 GiB)"
