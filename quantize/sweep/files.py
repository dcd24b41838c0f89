"""Folders shipped through Ray's object store: packed on the worker's own disk, written on the
driver whole or not at all (``quantize.atomic.atomic_folder``), so a killed worker or a Ctrl-C
never leaves a partial or a second copy of a variant."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from quantize.atomic import MARKER, atomic_folder, pid_alive

_PREFIX = "gemma3n-sweep-"


def pack(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path. The output marker is left out: the driver's
    own ``atomic_folder`` writes it for the files it really wrote."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}


def write_folder(final: Path, files: dict[str, bytes]) -> Path:
    with atomic_folder(final) as tmp:
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return Path(final)


@contextlib.contextmanager
def worker_tempdir():
    """A scratch folder on the worker's disk, removed afterwards. A worker killed mid-task (the
    case retries exist for) cannot remove its own, so each task first removes those whose
    process is gone."""
    root = Path(tempfile.gettempdir())
    for p in root.glob(f"{_PREFIX}*"):
        pid = p.name[len(_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
