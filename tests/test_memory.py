"""quantize.memory against the kernel's own count of resident pages (/proc/self/status)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from quantize.memory import release_free_memory

MiB = 2**20


def rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
def test_freed_blocks_pinned_in_the_heap_leave_after_release():
    torch.empty(16 * MiB // 4)  # a freed 16 MiB mmapped block: glibc raises its mmap threshold past it
    # Earlier tests in this process leave freed heap pages resident; new blocks would reuse them
    # without raising the RSS. Hand them back first, so the blocks below touch fresh pages.
    release_free_memory()
    before = rss()
    big, small = [], []
    for _ in range(24):  # 384 MiB of 16 MiB blocks, each followed by a small live one that pins the heap
        big.append(torch.ones(16 * MiB // 4))
        small.append(torch.ones(1024))
    assert rss() - before > 300 * MiB  # resident (ones() touched every page)
    del big
    release_free_memory()
    # whether the blocks were heap (trimmed now) or mmapped (gone at free), they are not resident
    assert rss() - before < 64 * MiB
    del small


# Run in a fresh interpreter: glibc's behaviour for a large block depends on the process's history
# (a heap grown earlier, here by the calibration engine in other tests, keeps free address space
# that serves large blocks before any new mmap), and this test asserts on the default first.
_REUSE_SCRIPT = r"""
import resource, re
from pathlib import Path
import torch
from quantize.memory import release_free_memory, reuse_freed_memory

MiB = 2**20

def rss():
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def faults_of_two_blocks():
    # write a 64 MiB block, free it, then write a 48 MiB one: both above glibc's largest mmap
    # threshold (32 MiB), so by default each is a fresh mapping
    counts = []
    for size in (64 * MiB, 48 * MiB):
        t = torch.empty(size // 4)
        before = minor_faults()
        t.fill_(1.0)  # the first write of every page
        counts.append(minor_faults() - before)
        del t
    return counts[1]

faults_of_two_blocks()
outside = faults_of_two_blocks()
release_free_memory()
before = rss()
with reuse_freed_memory() as told:
    faults_of_two_blocks()
    inside = faults_of_two_blocks()
    kept = rss() - before
returned = rss() - before
print(outside, int(told), inside, kept, returned)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_freed_large_blocks_are_reused_inside_reuse_freed_memory_and_returned_after():
    import subprocess

    out = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT], capture_output=True, text=True, check=True, timeout=120)
    outside, told, inside, kept, returned = map(int, out.stdout.split())
    pages48 = 48 * MiB // 4096
    assert outside > 0.9 * pages48  # by default unmapped at free: the next block faults in fresh zeroed pages
    assert told == 1  # glibc
    assert inside < 0.05 * pages48  # inside: served from the freed 64 MiB block's resident pages
    assert kept > 48 * MiB  # freed blocks stay in the heap meanwhile
    assert returned < 16 * MiB  # and their pages go back on leaving
