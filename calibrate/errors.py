"""The one error type of the calibrate package."""
from __future__ import annotations


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message starts with the source it came from.

    ``source`` is a human label such as ``calibration.text (files: corpus/*.jsonl)`` so that a
    recipe author can see at once which section and which file or dataset is at fault.
    """

    def __init__(self, source: str, message: str):
        self.source = source
        super().__init__(f"{source}: {message}")
