"""The reference model: a local folder, or a hub id read from the Hugging Face cache offline.

Like ``python -m quantize`` (which fetches a hub model once and then reads the cache), but eval
never downloads: it scores what is on this machine, so a missing model is an error that says how
to get it.
"""
from __future__ import annotations

from pathlib import Path

from eval.errors import EvalError


def resolve_reference(ref: str | Path) -> Path:
    """Folder of the reference model ``ref`` (a folder, or ``owner/name`` in the hub cache)."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise EvalError(f"--reference {text!r}: no such folder, and not a hub id of the form owner/name")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except Exception as e:  # huggingface_hub raises several types for "not cached"; all mean the same here
        raise EvalError(
            f"--reference {text!r}: not a local folder and not in the hub cache ({constants.HF_HUB_CACHE}); "
            f"eval reads the hub offline: download it first (huggingface-cli download {text}) "
            f"({type(e).__name__})"
        ) from e
