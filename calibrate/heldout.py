"""Held-out evaluation data: what the eval harness reads, disjoint from the embedded calibration data.

Text comes from the embedded corpus's ``eval`` split (calibration uses ``calib``, the tiny model
was trained on ``train``), images from scikit-image photographs that calibration never picks,
audio from the ``eval`` speech clips. Nothing here takes a seed: every run reads the same data.
"""
from __future__ import annotations

from calibrate import embedded_text
from calibrate.audio import SAMPLING_RATE, embedded_clips
from calibrate.images import embedded_images


def heldout_text(tokenizer, n_windows: int, seq_len: int) -> list:
    """``n_windows`` (1, seq_len) LongTensors of consecutive eval-split tokens, each starting with <bos>."""
    import torch

    from calibrate.text import heldout_windows

    return [torch.tensor([w], dtype=torch.long) for w in heldout_windows(tokenizer, n_windows, seq_len)]


def heldout_images() -> list:
    """RGB PIL images of the ``eval`` split of the embedded photographs."""
    return [it.image for it in embedded_images("eval")]


def heldout_audio() -> list[tuple]:
    """(float32 mono waveform, 16000) of each ``eval`` speech clip."""
    return [(it.waveform, SAMPLING_RATE) for it in embedded_clips("eval")]


def heldout_manifest() -> dict:
    """Ids and hashes of everything held out, for reports and for checks against a calibration manifest."""
    return {
        "text": {"split": "eval", "corpus_sha256": embedded_text.corpus_hash(),
                 "documents": [d.id for d in embedded_text.split_documents("eval")]},
        "images": [it.manifest() for it in embedded_images("eval")],
        "audio": [it.manifest() for it in embedded_clips("eval")],
    }
