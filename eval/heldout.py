"""Held-out evaluation data: text (and deterministic images / audio for the tower checks).

This module is the only place ``eval`` touches ``calibrate`` (the import rule allows it for
held-out data only). The text is the ``eval`` split of the embedded corpus, which the tiny
model never trained on and calibration never sees.
"""
from __future__ import annotations

import numpy as np

DOC_SEPARATOR = "\n\n"


def heldout_text() -> str:
    """The held-out text, the same string on every machine.

    Uses ``calibrate.heldout_text()`` when the calibrate package provides it, else joins the
    ``eval`` split of the embedded corpus (documents in id order) with blank lines.
    """
    import calibrate

    provider = getattr(calibrate, "heldout_text", None)
    if provider is None:
        try:
            from calibrate import heldout as _heldout  # written by the calibrate helper

            provider = getattr(_heldout, "heldout_text", None)
        except ImportError:
            provider = None
    if provider is not None:
        return provider()
    from calibrate.embedded_text import split_documents

    return DOC_SEPARATOR.join(d.text for d in split_documents("eval"))


def heldout_images(n: int = 2, size: int = 768, seed: int = 0) -> list[np.ndarray]:
    """Deterministic RGB uint8 images (H, W, 3): smooth gradients plus seeded shapes and noise.

    Synthetic on purpose: nothing is downloaded, and the tower check compares an artifact to
    the reference on identical inputs, so natural-image statistics matter less than coverage of
    the tower's whole input range.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = []
    for i in range(n):
        r = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * (i + 1) + rng.uniform()))
        g = 0.5 + 0.5 * np.cos(2 * np.pi * (yy * (i + 2) + rng.uniform()))
        b = (xx + yy) / 2
        img = np.stack([r, g, b], axis=-1)
        for _ in range(4):
            cx, cy, rad = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < rad**2
            img[mask] = rng.uniform(0, 1, size=3)
        img = img + rng.normal(0, 0.03, img.shape)
        images.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    return images


def heldout_audio(n: int = 2, seconds: float = 2.0, rate: int = 16000, seed: int = 0) -> list[np.ndarray]:
    """Deterministic mono float32 waveforms in [-1, 1]: chirps, harmonics and seeded noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate), dtype=np.float64) / rate
    clips = []
    for i in range(n):
        f0, f1 = 100.0 * (i + 1), 2000.0 * (i + 1)
        chirp = np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)))
        harm = 0.3 * np.sin(2 * np.pi * 220.0 * (i + 1) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        wave = 0.5 * chirp + harm + 0.05 * rng.normal(size=t.shape)
        clips.append((wave / np.abs(wave).max() * 0.9).astype(np.float32))
    return clips
