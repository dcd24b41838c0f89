"""Handing freed heap memory back to the operating system, and keeping it for reuse where that
is what costs time.

glibc's malloc serves a large block from its heap, not from a fresh ``mmap``, once its dynamic
mmap threshold has risen (it rises to the size of every freed mmapped block, up to 32 MiB), and
pages freed inside a heap that later blocks pin stay resident. A calibrated run frees and
reallocates one layer's hidden states, Hessians and GPTQ workspace per layer, so without a trim
its resident size ratchets up layer by layer (measured on a 4-layer cut of E4B's shapes at
32 x 512 tokens, VmHWM polled: about 0.12 GiB more peak per layer without, 0.04 with the trim;
tests/test_memory.py shows the mechanism). ``malloc_trim(0)`` returns every free page
(``madvise``), so each layer starts from what is alive.

Inside the decoder loop the blocks also stay in the heap between the trims
(``reuse_freed_memory``): a block above glibc's largest mmap threshold (32 MiB: every
E4B-sized weight copy, Hessian and activation) is otherwise a fresh ``mmap`` each time, and
each of its pages faults in zeroed when first written. The calibrated E4B run (bf16, 4 x 512
tokens, 35 layers) took 1.4 million minor faults per layer (5.6 GB of fresh pages), and once
the page cache holds the checkpoint each fault first reclaims a cached page: system time grew
from 2.8 to 5 s per layer. From the heap, a freed block's pages serve the later blocks that fit
in it: 0.53 million faults and 1.3 s of system time per layer, and the decoder took 405 s
instead of 471 (the whole run 542 s instead of 609). The price is the heap's fragmentation
within a layer (torch asks for 64-byte-aligned blocks, so a block never fits exactly in the
hole an equal one left): that run's peak was 3.4 GiB during the decoder instead of 2.7, still
bounded by the per-layer trim. Without the trim the same run grew 0.4 GiB per layer.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Iterator

# glibc's mallopt parameters and their defaults (malloc/malloc.c), restored on leaving
# reuse_freed_memory unless the environment set them (MALLOC_*_ variables).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_RESTORE = ((_M_MMAP_MAX, "MALLOC_MMAP_MAX_", 65536), (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 128 * 1024))
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


@functools.cache
def _libc_function(name: str):
    """glibc's ``name`` or None (not Linux, or a libc without it: musl has no malloc_trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, name, None)


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True if any were (False where there is no glibc)."""
    trim = _libc_function("malloc_trim")
    return bool(trim(0)) if trim is not None else False


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Inside, every block comes from malloc's heap (no per-block ``mmap``) and freed memory stays
    there for the next allocation; on leaving, glibc's settings are restored and every free page
    is returned (``release_free_memory``). Yields whether the allocator could be told (glibc).

    The settings are the process's: a thread allocating meanwhile shares them. Two effects
    outlast the block: glibc stops adjusting its mmap threshold once ``mallopt`` has been
    called, so it keeps the value it had reached (at most 32 MiB); and the heap keeps the
    address space it grew to, whose free chunks (their pages returned) serve later large blocks
    before any new mmap, so such a block stays resident after it is freed until the next
    ``release_free_memory`` (the pipeline calls it after calibration; the bench's whole-run peak,
    writers included, was 3.6 GiB against the decoder's 3.4)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None or _libc_function("malloc_trim") is None:
        yield False
        return
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield True
    finally:
        for param, env, default in _RESTORE:
            try:
                mallopt(param, int(os.environ.get(env, default)))
            except ValueError:
                mallopt(param, default)
        release_free_memory()
