"""hardware.tune_malloc: with glibc's thresholds raised, a freed large tensor stays in the heap for the next one
instead of going back to the kernel (to be page-faulted in again): in the main thread, and in other threads when
the process started with one arena (the benchmarks). Checked in a child process (the setting is process-wide) from
its resident set size."""

import os
import platform
import subprocess
import sys

import pytest

CHILD = """
import sys, threading, torch
from pathlib import Path
from convobot.model import cpu_memory
mode, where = sys.argv[1:]
if mode == "keep":
    assert cpu_memory.keep_freed_memory()
else:
    assert cpu_memory.set_malloc_thresholds(32 << 20, 64 << 20)  # where glibc's adaptive rule stops: its own way
def resident():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024
def allocate_and_free():
    logits = torch.empty(448, 50257).fill_(1.0)  # a GPT-2 head's fp32 logits for 448 tokens: 90 MB
    del logits
before = resident()
if where == "thread":
    worker = threading.Thread(target=allocate_and_free)
    worker.start()
    worker.join()
else:
    allocate_and_free()
print((resident() - before) / (448 * 50257 * 4))
"""


def kept_fraction(mode: str, where: str = "main", arenas: str | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    if arenas:
        env["MALLOC_ARENA_MAX"] = arenas
    done = subprocess.run([sys.executable, "-c", CHILD, mode, where], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="glibc on Linux only")


@glibc_only
def test_freed_memory_stays_for_reuse():
    assert kept_fraction("default") < 0.1  # control: glibc's own thresholds hand it back at once
    assert kept_fraction("keep") > 0.9


@glibc_only
def test_freed_memory_stays_for_reuse_in_other_threads_with_one_arena():
    assert kept_fraction("keep", "thread") < 0.1  # control: a thread's own arena mmaps a 90 MB block
    assert kept_fraction("keep", "thread", arenas="1") > 0.9
