"""Folders that appear whole or not at all: build under a temporary sibling name, rename at
the end, remove on any failure (so an interrupted run leaves no output behind)."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from quantize.errors import QuantizeError


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield a temporary sibling folder; rename it to ``final`` only if the block succeeds."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise QuantizeError(f"{final} exists and is not a folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
