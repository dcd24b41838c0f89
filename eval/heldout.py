"""Held-out evaluation data, from ``calibrate.heldout`` (the only use eval makes of calibrate).

Text: windows of the embedded corpus's ``eval`` split (never trained on, never calibrated on),
each ``<bos>`` followed by ``seq_len - 1`` consecutive tokens, documents separated by ``<eos>``.
Images: scikit-image photographs of the ``eval`` split. Audio: the ``eval`` speech clips.
"""
from __future__ import annotations

import numpy as np

from eval.errors import EvalError


def heldout_windows(tokenizer, n_windows: int, seq_len: int) -> np.ndarray:
    """(n_windows, seq_len) int32 token ids, <bos> first in each row."""
    import calibrate

    if n_windows < 1 or seq_len < 4:
        raise EvalError(f"need --n-windows >= 1 and --seq-len >= 4, got {n_windows} and {seq_len}")
    try:
        windows = calibrate.heldout_text(tokenizer, n_windows, seq_len)
    except calibrate.CalibrationError as e:
        raise EvalError(f"held-out text: {e}") from e
    return np.concatenate([w.numpy() for w in windows]).astype(np.int32)


def heldout_text_sha256() -> str:
    import calibrate

    return calibrate.heldout_manifest()["text"]["corpus_sha256"]


def heldout_images() -> list:
    """RGB PIL images."""
    import calibrate

    return calibrate.heldout_images()


def heldout_audio() -> list[tuple[np.ndarray, int]]:
    """(float32 mono waveform, sampling rate) pairs."""
    import calibrate

    return calibrate.heldout_audio()
