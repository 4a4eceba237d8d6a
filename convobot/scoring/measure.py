"""What runs, merges and benchmarks report about themselves: wall seconds per stage, peak memory, library versions."""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from typing import Iterator

import torch


class Stopwatch:
    """Wall seconds per named stage: `with clock("merge"): ...`, then `clock.seconds`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def peak_memory_bytes(device: torch.device | str) -> int:
    """CUDA max allocated on GPU; peak resident set size of this process on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(peak_kib if sys.platform == "darwin" else peak_kib * 1024)


def versions() -> dict[str, str]:
    packages = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
