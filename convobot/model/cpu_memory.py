"""glibc malloc settings for training on CPU.

glibc hands every allocation above its mmap threshold (which its adaptive rule raises to 32 MiB at most) fresh
pages from the kernel and gives them back on free; freed memory above its trim threshold at the top of the heap
goes back too. Each training step then page-faults its large tensors in again: the (tokens x 50257) logits of
GPT-2's head are 90 MB at 448 tokens, and a GPT-2 small LoRA step takes ~250k minor faults, ~7% of its time.
Raising the mmap threshold and switching trimming off keeps freed memory in the heap for the next step, as jemalloc
or tcmalloc would (PyTorch's CPU performance guide). The cost: the process holds on to its peak footprint. (The
benchmark's reference, a full fine-tune on padded rows of varying length, still faulted tens of thousands of pages
per step with a 1 GiB trim threshold; with trimming off, none once warm.)
That holds for glibc's main arena, where the main thread (training) allocates. A thread other than the main one
gets its own arena of 64 MiB heaps, and a larger block there is mmapped whatever the threshold (a GPT-2 small LoRA
step in a thread: ~240k faults instead of ~45k, ~10% of its time). glibc fixes the arena limit when a thread first
allocates, so a program that trains in threads (the benchmarks) sets it at start-up: `restart_with_one_arena`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
KEEP = 1 << 30  # allocations up to 1 GiB come from the heap
NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, trim_bytes))


def keep_freed_memory() -> bool:
    """Keep freed memory for reuse instead of faulting it in again every step (hardware.tune_malloc)."""
    applied = set_malloc_thresholds(KEEP, NEVER_TRIM)
    if not applied:
        log.info("hardware.tune_malloc: not glibc, allocator left as it is")
    return applied


def restart_with_one_arena() -> None:
    """Re-execute this Python program with glibc's arena limit at one (MALLOC_ARENA_MAX, read at start-up), so
    that every thread allocates from the main arena; nothing to do when it is set already."""
    if os.environ.get("MALLOC_ARENA_MAX") != "1":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_ARENA_MAX": "1"})
