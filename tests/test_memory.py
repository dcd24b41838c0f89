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
