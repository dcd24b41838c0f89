"""Perplexity windows scored like llama.cpp's ``llama-perplexity``.

The held-out text is cut into consecutive, non-overlapping windows of ``n_ctx`` tokens that
start with ``<bos>`` (``eval.heldout``); each window is evaluated from an empty cache and only
the second half is scored: the logits at positions ``first .. n_ctx - 2``
(``first = n_ctx // 2``) predict the tokens at ``first + 1 .. n_ctx - 1``. Every position that
is scored therefore sees at least ``n_ctx / 2`` tokens of context, which keeps numbers
comparable across backends and with llama.cpp's own tool.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np



@dataclass(frozen=True)
class Windows:
    tokens: np.ndarray  # (n_windows, n_ctx) int32; tokens[:, 0] == bos
    first: int  # first scored logit position

    @property
    def n_ctx(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_windows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def scored_per_window(self) -> int:
        return self.n_ctx - 1 - self.first

    def targets(self) -> np.ndarray:
        """(n_windows, scored_per_window) next-token ids that the scored logits predict."""
        return self.tokens[:, self.first + 1 :]


def scored_logits(logits: np.ndarray, windows: Windows) -> np.ndarray:
    """The rows of one window's (n_ctx, vocab) logits that are scored."""
    return logits[windows.first : windows.n_ctx - 1]


def perplexity(nll: np.ndarray) -> dict:
    """Perplexity and its uncertainty from per-token negative log-likelihoods (natural log).

    ``ppl_stderr`` propagates the standard error of the mean NLL, as llama.cpp prints it.
    """
    nll = np.asarray(nll, dtype=np.float64)
    mean = float(nll.mean())
    se = float(nll.std(ddof=1) / np.sqrt(len(nll))) if len(nll) > 1 else 0.0
    ppl = float(np.exp(mean))
    return {"ppl": ppl, "ppl_stderr": ppl * se, "nll_mean": mean, "n_tokens": int(len(nll))}
