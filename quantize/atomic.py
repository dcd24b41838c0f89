"""Output folders that appear whole or not at all, and never at the cost of a user's files.

A run builds its output in a hidden sibling, ``.NAME.partial-PID``, and renames it to ``NAME``
at the end; any failure (an exception, Ctrl-C, SIGTERM) removes the partial. Every folder made
here carries a marker file, ``.gemma3n-quantize`` (JSON):

- in a partial: ``{"tool", "state": "partial", "host", "boot_id", "pid"}``, so that a later run
  can prove that a partial left by a killed run (SIGKILL, power loss) is ours and stale (same
  host, and that boot ended or that process is gone) and remove it. A ``.NAME.partial-N``
  without our marker is never touched.
- in a finished output: ``{"tool", "state": "output", "files": [...]}``, every file the run
  wrote. An existing ``NAME`` is replaced only when it holds nothing but such files; the old
  one is renamed away, the new one renamed in, then only the listed files are removed.

Anything else in ``NAME`` (a non-empty folder without our marker, or an old output the user has
added files to) is refused, unless the caller passes ``overwrite``: then that folder is renamed
whole to ``NAME.backup-N`` beside it. Nothing this module did not write is ever deleted.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from quantize.errors import QuantizeError

log = logging.getLogger(__name__)

TOOL = "gemma3n-quantize"
MARKER = ".gemma3n-quantize"
_STALE_KINDS = ("partial", "old")
# Partials this process is building now (a PID can repeat across boots and containers: a
# partial named with our own PID is stale unless it is one of these).
_ACTIVE: set[Path] = set()


class OutputError(QuantizeError):
    """The output folder cannot be written without touching files this tool did not write."""


def check_output(final: str | Path, overwrite: bool = False) -> str:
    """What writing ``final`` will do: ``"new"`` (absent or empty), ``"replace"`` (an earlier
    output of this tool) or ``"backup"`` (anything else, allowed only with ``overwrite``: it is
    moved to ``NAME.backup-N``). Raises ``OutputError`` (one line) otherwise, and always for a
    ``final`` that is, or holds, the home or current folder. Reads only."""
    final = Path(final)
    # first: never offer --overwrite for a folder that must not be moved at all
    for folder, what in ((Path.home(), "your home folder"), (Path.cwd(), "the current folder")):
        refuse_if_holds(final, folder, what)
    if not final.exists() and not final.is_symlink():
        return "new"
    if final.is_symlink():
        raise OutputError(f"output: {final} is a symbolic link; give the folder it points to ({os.path.realpath(final)})")
    if not final.is_dir():
        raise OutputError(f"output: {final} exists and is not a folder; choose another output folder")
    present = _files_under(final)
    if not present:
        return "new"
    foreign = sorted(present - _owned_files(final))
    if not foreign:
        return "replace"
    if overwrite:
        return "backup"
    what = (
        f"holds {foreign[0]}" + (f" and {len(foreign) - 1} more file(s)" if len(foreign) > 1 else "")
        + f" that {TOOL} did not write"
    )
    raise OutputError(
        f"output: {final} {what}; choose another output folder (--out), or pass --overwrite to "
        f"move it aside to {_backup_name(final).name} (nothing is deleted)"
    )


def refuse_if_holds(final: str | Path, folder: str | Path, what: str) -> None:
    """Replacing ``final`` renames it as a whole: refuse when that would move ``folder`` away."""
    final_r, folder_r = Path(final).resolve(), Path(folder).resolve()
    if final_r == folder_r or final_r in folder_r.parents:
        raise OutputError(f"output: {final} is or contains {what} ({folder}); choose an output folder of its own")


@contextlib.contextmanager
def atomic_folder(final: str | Path, overwrite: bool = False):
    """Yield a fresh hidden sibling folder; when the block succeeds it becomes ``final``
    (see the module docstring for what happens to an existing ``final``). On any failure the
    partial is removed and ``final`` is left as it was; a full disk becomes one ``QuantizeError``
    line naming ``final``."""
    final = Path(final)
    check_output(final, overwrite)
    made = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(final)
        tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
        tmp.mkdir()
    except OSError as e:
        _remove_empty(made)
        if _is_disk_full(e):
            raise _disk_error(final, e) from None
        raise OutputError(f"output: cannot create {final} ({e.strerror or e}: {e.filename or final.parent})") from None
    _ACTIVE.add(tmp)
    try:
        _write_marker(tmp, {"state": "partial", "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid()})
        yield tmp
        _write_marker(tmp, {"state": "output", "files": sorted(_files_under(tmp) - {MARKER})})
        _commit(tmp, final, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        if _is_disk_full(e):
            raise _disk_error(final, e) from None
        raise
    finally:
        _ACTIVE.discard(tmp)


def remove_stale(final: str | Path) -> list[Path]:
    """Remove ``.NAME.partial-PID`` / ``.NAME.old-PID`` siblings of ``final`` that a killed
    run of this tool left: our marker inside, written on this host, and its boot over or its
    process gone. Returns what was removed."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for kind in _STALE_KINDS:
        for p in sorted(final.parent.glob(f".{final.name}.{kind}-*")):
            if _is_stale(p, kind):
                log.info("removing %s, left by an interrupted run", p)
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _is_stale(p: Path, kind: str) -> bool:
    pid_text = p.name.rsplit("-", 1)[-1]
    if not pid_text.isdigit() or p.is_symlink() or not p.is_dir() or p in _ACTIVE:
        return False
    marker = _read_marker(p)
    if marker is None:
        return False
    if kind == "old":  # a replaced output whose removal was cut short: ours if fully listed
        return marker.get("state") == "output" and not (_files_under(p) - _owned_files(p)) and not pid_alive(int(pid_text))
    if marker.get("state") != "partial" or marker.get("host") != socket.gethostname():
        return False  # another machine's run (a shared filesystem): its PID means nothing here
    if marker.get("boot_id") and marker.get("boot_id") != _boot_id():
        return True
    return not pid_alive(int(pid_text))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (our own PID counts as gone: a folder named with it that we
    are not building is an earlier process's)."""
    if pid == os.getpid():
        return False  # our own PID on a folder we are not building (``_ACTIVE``): an earlier process's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _commit(tmp: Path, final: Path, overwrite: bool) -> None:
    # Re-checked here: the user may have put files into ``final`` while the run was going.
    action = check_output(final, overwrite)
    moved = None
    if action == "backup":
        moved = _backup_name(final)
    elif os.path.lexists(final):
        moved = final.parent / f".{final.name}.old-{os.getpid()}"
    if moved is not None:
        final.rename(moved)
    try:
        tmp.rename(final)
    except BaseException:
        if moved is not None:
            moved.rename(final)  # put back what was there
        raise
    if action == "backup":
        log.warning("moved the existing %s to %s (it held files %s did not write)", final, moved, TOOL)
    elif moved is not None:
        _remove_listed(moved, final)


def _remove_listed(folder: Path, final: Path) -> None:
    """Delete an earlier output: only the files its marker lists, then the folders left empty.
    Whatever else is there by now stays, in a visible backup folder."""
    for rel in sorted(_owned_files(folder)):
        p = folder / rel.rstrip("/")
        if not rel.endswith("/") or p.is_symlink():  # "d/" entries are folders: rmdir'd below
            p.unlink(missing_ok=True)
    for d in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    try:
        folder.rmdir()
    except OSError:
        backup = _backup_name(final)
        folder.rename(backup)
        log.warning("kept files added to the earlier output in %s", backup)


def _backup_name(final: Path) -> Path:
    n = 1
    while os.path.lexists(final.parent / f"{final.name}.backup-{n}"):
        n += 1
    return final.parent / f"{final.name}.backup-{n}"


def _remove_empty(folders: list[Path]) -> None:
    """Remove the parent folders a failed run created, deepest first, if still empty."""
    for d in folders:
        with contextlib.suppress(OSError):
            d.rmdir()


def _write_marker(folder: Path, fields: dict) -> None:
    (folder / MARKER).write_text(json.dumps({"tool": TOOL, **fields}, indent=1, sort_keys=True) + "\n")


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


def _owned_files(folder: Path) -> set[str]:
    """Files (relative paths) the marker of ``folder`` says this tool wrote, marker included."""
    marker = _read_marker(folder)
    if marker is None or marker.get("state") != "output" or not isinstance(marker.get("files"), list):
        return set()
    return {str(f) for f in marker["files"]} | {MARKER}


def _files_under(folder: Path) -> set[str]:
    """Every entry below ``folder`` that is not a folder (symlinks included), as relative paths;
    empty folders count too, so that nothing the user made is mistaken for nothing."""
    out = set()
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out.update(str(rel / f) for f in files)
        out.update(str(rel / d) + "/" for d in dirs if os.path.islink(os.path.join(root, d)) or not os.listdir(os.path.join(root, d)))
    return out


def _is_disk_full(e: BaseException | None) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain; safetensors' Rust writer reports it as text."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(s in str(e) for s in ("No space left on device", "StorageFull", "Disk quota exceeded")):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_error(final: Path, e: BaseException) -> QuantizeError:
    return OutputError(f"output: no space left on the device of {final.parent} while writing {final}; "
                       "free some space or choose another --out (nothing was written)")
