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



def minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_of_two_blocks() -> tuple[int, int]:
    """Page faults of writing a 64 MiB block, freeing it, then writing a 48 MiB one: both above
    glibc's largest mmap threshold (32 MiB), so by default each is a fresh mmap."""
    counts = []
    for size in (64 * MiB, 48 * MiB):
        t = torch.empty(size // 4)
        before = minor_faults()
        t.fill_(1.0)  # the first write of every page
        counts.append(minor_faults() - before)
        del t
    return counts[0], counts[1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_freed_large_blocks_are_reused_inside_reuse_freed_memory_and_returned_after():
    from quantize.memory import reuse_freed_memory

    pages48 = 48 * MiB // 4096
    faults_of_two_blocks()
    _, outside = faults_of_two_blocks()
    assert outside > 0.9 * pages48  # unmapped at free: the next block faults in fresh zeroed pages
    release_free_memory()
    before = rss()
    with reuse_freed_memory() as told:
        assert told  # glibc
        faults_of_two_blocks()
        _, inside = faults_of_two_blocks()
        assert inside < 0.05 * pages48  # served from the freed 64 MiB block's resident pages
        assert rss() - before > 48 * MiB  # freed blocks stay in the heap meanwhile
    assert rss() - before < 16 * MiB  # and go back on leaving
    _, after = faults_of_two_blocks()
    assert after > 0.9 * pages48  # glibc's own settings again
