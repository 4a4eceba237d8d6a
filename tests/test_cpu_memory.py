"""hardware.tune_malloc: with glibc's thresholds raised, a freed large tensor stays in the heap for the next one
instead of going back to the kernel (to be page-faulted in again). Checked in a child process (the setting is
process-wide) from its resident set size."""

import subprocess
import sys

import pytest

from convobot import cpu_memory

CHILD = """
import sys, torch
from pathlib import Path
from convobot import cpu_memory
if sys.argv[1] == "keep":
    assert cpu_memory.keep_freed_memory()
else:
    assert cpu_memory.set_malloc_thresholds(*cpu_memory.GLIBC_CEILING)
def resident():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024
before = resident()
logits = torch.empty(448, 50257).fill_(1.0)  # a GPT-2 head's fp32 logits for 448 tokens: 90 MB
del logits
print((resident() - before) / (448 * 50257 * 4))
"""


def kept_fraction(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not cpu_memory.set_malloc_thresholds(
    *cpu_memory.GLIBC_CEILING), reason="glibc on Linux only")
def test_freed_memory_stays_for_reuse():
    assert kept_fraction("default") < 0.1  # control: glibc's own thresholds hand it back at once
    assert kept_fraction("keep") > 0.9
