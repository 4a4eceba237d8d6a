"""glibc malloc thresholds for training on CPU.

glibc hands every allocation above its mmap threshold (which its adaptive rule raises to 32 MiB at most) fresh
pages from the kernel and gives them back on free; freed memory above its trim threshold at the top of the heap
goes back too. Each training step then page-faults its large tensors in again: the (tokens x 50257) logits of
GPT-2's head are 90 MB at 448 tokens, and a GPT-2 small LoRA step takes ~250k minor faults, ~7% of its time.
Raising both thresholds keeps freed memory in the heap for the next step, as jemalloc or tcmalloc would (PyTorch's
CPU performance guide). The cost: the process holds on to its peak footprint between steps.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
KEEP = 1 << 30  # allocations up to 1 GiB come from the heap; up to 1 GiB of freed memory stays there
GLIBC_CEILING = (32 << 20, 64 << 20)  # the (mmap, trim) thresholds glibc's adaptive rule stops at


def set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> bool:
    """Set glibc's mmap and trim thresholds for this process; False where libc is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, trim_bytes))


def keep_freed_memory() -> bool:
    """Keep freed memory for reuse instead of faulting it in again every step (hardware.tune_malloc)."""
    applied = set_malloc_thresholds(KEEP, KEEP)
    if not applied:
        log.info("hardware.tune_malloc: not glibc, allocator left as it is")
    return applied
