"""difftune/heap.py: glibc keeps freed memory for the next step, unless the launch decided."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

from difftune import heap


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def test_the_launch_decides_when_it_tunes_malloc():
    assert heap.launch_tunes_malloc({"PATH": "/bin"}) is None
    assert heap.launch_tunes_malloc({"MALLOC_ARENA_MAX": "2"}) == "MALLOC_ARENA_MAX"
    assert heap.launch_tunes_malloc({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "GLIBC_TUNABLES"
    assert heap.launch_tunes_malloc({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}).startswith("LD_PRELOAD=")
    assert heap.launch_tunes_malloc({"LD_PRELOAD": "/usr/lib/libtcmalloc_minimal.so.4"}).startswith("LD_PRELOAD=")
    assert heap.launch_tunes_malloc({"LD_PRELOAD": "/usr/lib/libmimalloc.so"}).startswith("LD_PRELOAD=")


def test_off_and_tuned_launches_are_left_alone(monkeypatch):
    assert heap.keep_freed_memory(False).startswith("off")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert heap.keep_freed_memory(True) == "left to the launch (MALLOC_ARENA_MAX)"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_large_block_comes_from_the_heap_once_kept(monkeypatch):
    for name in [n for n in __import__("os").environ if n.startswith("MALLOC_") or n == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(name)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert heap.keep_freed_memory(True).startswith("kept")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    mapped_before = libc.mallinfo2().hblkhd
    block = libc.malloc(100 * 2**20)  # above glibc's largest mmap threshold (32 MiB)
    try:
        assert block
        assert libc.mallinfo2().hblkhd == mapped_before  # not a block of its own mapping
    finally:
        libc.free(block)
