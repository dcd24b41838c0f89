"""Calibration data for Gemma 3n: text, images and audio, from datasets, local files or the
embedded offline default.

Public entry points (imported lazily, so ``import calibrate.config`` stays light):
- ``build_calibration(config, processor, seed) -> CalibrationSet``
- ``heldout_text(tokenizer, n_windows, seq_len)``, ``heldout_images()``, ``heldout_audio()``,
  ``heldout_manifest()``: evaluation data that calibration never reads by default.
- ``CalibrationError``: every bad-input error, its message starting with the source's label.

Import rule: this package imports nothing from ``quantize`` or ``eval``; it only depends on
third-party libraries and the standard library.
"""
from __future__ import annotations

from calibrate.errors import CalibrationError

_LAZY = {
    "build_calibration": "calibrate.dataset",
    "CalibrationSet": "calibrate.dataset",
    "heldout_text": "calibrate.heldout",
    "heldout_images": "calibrate.heldout",
    "heldout_audio": "calibrate.heldout",
    "heldout_manifest": "calibrate.heldout",
    "CalibrationConfig": "calibrate.config",
}

__all__ = ["CalibrationError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'calibrate' has no attribute {name!r}")
