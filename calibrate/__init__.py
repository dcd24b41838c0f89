"""Calibration data for Gemma 3n: text, images and audio, from datasets, local files or the
embedded offline default.

Import rule: this package imports nothing from ``quantize`` or ``eval``; it only depends on
third-party libraries and the standard library.
"""
