"""Work that a calibrated run overlaps with its calibration: one thread at the lowest priority.

The decoder's calibration keeps the cores busy with GEMMs but leaves the disk idle. Work that
does not depend on the calibration's result and mostly waits on the disk (the checkpoint's
sha256: 18 s in series on E4B's shapes here) runs meanwhile on one thread at nice 19 (Linux:
that thread only, not the calibration's), so that it takes a core only when the calibration
leaves one idle; ``result()`` waits for whatever is left, which is at worst the time the work
took in series. Not for CPU-bound torch work: the embedding tables' importance search tried
this way (2026-12-01) slowed the 35-layer decoder from 418 to 493 s, more than the 30 s it
hid (its OpenMP team competes with the calibration's even at nice 19). CPU-bound work without
torch fits in small slices (``quantize.formats.gguf.preencode``: ggml's reference K-quant encoder
on the embedding tables, a few MB of cache at a time); not dense compiled kernels (the numba
Q4_K / Q5_K: beside the 35-layer calibration they cost it about 45 s, the export saved 26).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class Cancelled(Exception):
    """The work saw its ``stop`` event set: the run it served failed."""


class LowPriorityTask(Generic[T]):
    """``fn(stop)`` on its own thread, started now. ``fn`` checks ``stop`` (a ``threading.Event``)
    between steps and raises ``Cancelled`` once it is set; ``cancel()`` sets it and waits for
    the thread (a failed run does not wait for the work to finish)."""

    def __init__(self, name: str, fn: Callable[[threading.Event], T]):
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._future = self._pool.submit(self._run, fn)

    def _run(self, fn: Callable[[threading.Event], T]) -> T:
        try:  # this thread only (its Linux thread id); threads it starts inherit the priority
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):  # no per-thread priority here: run at normal priority
            pass
        return fn(self._stop)

    def result(self) -> T:
        try:
            return self._future.result()
        except BaseException:  # interrupted while waiting, or the work failed: the thread stops too
            self._stop.set()
            raise
        finally:
            self._pool.shutdown()

    def cancel(self) -> None:
        self._stop.set()
        self._pool.shutdown(cancel_futures=True)
