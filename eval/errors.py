"""The one error type of the eval package (bad input: files, options, mismatched results)."""
from __future__ import annotations


class EvalError(ValueError):
    """Raised for invalid input; the message names the file, key or option and what is valid.

    The command line maps it to exit code 2 without a traceback.
    """
