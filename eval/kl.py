"""The reference's log-probabilities, stored once, and KL divergence statistics against them.

Storage (the "KL base", like llama.cpp's ``--kl-divergence-base``): for every scored position,
the reference's ``top_k`` log-probabilities and token ids, plus the log of the probability mass
outside the top k. KL is then computed between the two distributions coarse-grained to
``top_k + 1`` outcomes (the top-k tokens of the reference, and "everything else"):

    KL_k(P || Q) = sum_{i in top-k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

By the log-sum inequality this is a lower bound of the full-vocabulary KL, and it equals it
when ``top_k`` is the vocabulary size (``top_k=0`` stores the full distribution). The default
k = 32 keeps the file small for 262k-token vocabularies; with the tiny model's vocabulary the
bound is tight in practice (the top 32 tokens carry almost all of the mass).

Vocabulary: both sides are compared over the reference's vocabulary. A GGUF vocabulary may be
padded beyond it (never smaller); extra logits are dropped before the softmax, so both
distributions live on the same ids. Gemma 3n soft-caps its final logits at 30; transformers and
llama.cpp both do it inside the model, so the logits we read are already capped.

The reference evaluated against its own base gives exactly 0.0: its log-probabilities are
recomputed with the same float32 code from bit-identical logits (one sequence per forward, same
threads), and the rest mass with the same float64 log-sum-exp over the same ids.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eval.errors import EvalError
from eval.atomic_file import atomic_path

BASE_FORMAT = "gemma3n-eval-kl-base/1"
DEFAULT_TOP_K = 32


def log_softmax(logits: np.ndarray, vocab: int) -> np.ndarray:
    """float32 log-probabilities over the first ``vocab`` logits (drops padded ids)."""
    if logits.shape[-1] < vocab:
        raise EvalError(f"artifact vocabulary has {logits.shape[-1]} ids, fewer than the reference's {vocab}")
    t = torch.from_numpy(np.ascontiguousarray(logits[..., :vocab], dtype=np.float32))
    return torch.log_softmax(t, dim=-1).numpy()


def rest_logmass(logp: np.ndarray, top_ids: np.ndarray) -> np.ndarray:
    """log of the probability mass outside ``top_ids`` per row, in float64 (-inf if none).

    A log-sum-exp over the remaining ids rather than ``log(1 - sum(top))``, which loses all
    precision when the top k hold nearly all of the mass.
    """
    t = torch.from_numpy(np.ascontiguousarray(logp)).to(torch.float64)
    t.scatter_(-1, torch.from_numpy(top_ids.astype(np.int64)), float("-inf"))
    return torch.logsumexp(t, dim=-1).numpy()


@dataclass
class KLBase:
    """Top-k reference log-probs for every scored position of every window."""

    tokens: np.ndarray  # (n_windows, n_ctx) int32, the exact ids every backend evaluates
    first: int
    vocab: int
    top_ids: np.ndarray  # (n_positions, k) int32, sorted by decreasing probability
    top_logp: np.ndarray  # (n_positions, k) float32
    rest_logp: np.ndarray  # (n_positions,) float64
    meta: dict = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return int(self.top_ids.shape[1])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                format=np.array(BASE_FORMAT),
                tokens=self.tokens,
                first=np.array(self.first),
                vocab=np.array(self.vocab),
                top_ids=self.top_ids,
                top_logp=self.top_logp,
                rest_logp=self.rest_logp,
                meta=np.array(json.dumps(self.meta, sort_keys=True)),
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> "KLBase":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = str(z["format"])
                if fmt != BASE_FORMAT:
                    raise EvalError(f"{path}: KL base format {fmt!r}, expected {BASE_FORMAT!r}")
                return cls(
                    tokens=z["tokens"],
                    first=int(z["first"]),
                    vocab=int(z["vocab"]),
                    top_ids=z["top_ids"],
                    top_logp=z["top_logp"],
                    rest_logp=z["rest_logp"],
                    meta=json.loads(str(z["meta"])),
                )
        except (OSError, KeyError, ValueError) as e:
            if isinstance(e, EvalError):
                raise
            raise EvalError(f"{path}: not a KL base file ({e})") from e


def topk_rows(logp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and log-probs of the k most likely tokens per row, most likely first."""
    t = torch.from_numpy(logp)
    k = logp.shape[-1] if k <= 0 or k > logp.shape[-1] else k
    vals, ids = torch.topk(t, k, dim=-1, largest=True, sorted=True)
    return ids.numpy().astype(np.int32), vals.numpy().astype(np.float32)


def kl_rows(base_ids: np.ndarray, base_logp: np.ndarray, base_rest: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """Coarse-grained KL(P || Q) per row (float64), Q given as full float32 log-probs."""
    q_top = np.take_along_axis(logq, base_ids.astype(np.int64), axis=-1)
    q_rest = rest_logmass(logq, base_ids)
    p_top = base_logp.astype(np.float64)
    kl = (np.exp(p_top) * (p_top - q_top.astype(np.float64))).sum(axis=-1)
    p_rest = np.exp(base_rest)
    has_rest = p_rest > 0
    with np.errstate(invalid="ignore"):
        tail = np.where(has_rest, p_rest * (base_rest - q_rest), 0.0)
    return kl + tail


def kl_summary(kl: np.ndarray, top1: np.ndarray, window_means: list[float] | None = None) -> dict:
    """mean, median, 99th percentile, max of per-token KL and top-1 agreement (fraction); with
    ``window_means``, the mean KL of each evaluation window (the independent units a paired
    comparison of two artifacts resamples: ``paired_ratio``)."""
    kl = np.asarray(kl, dtype=np.float64)
    out = {
        "mean": float(kl.mean()),
        "median": float(np.median(kl)),
        "p99": float(np.percentile(kl, 99)),
        "max": float(kl.max()),
        "top1": float(np.mean(top1)),
        "n_tokens": int(len(kl)),
    }
    if window_means is not None:
        out["window_means"] = [float(v) for v in window_means]
    return out


def paired_ratio(a, b, level: float = 0.95, n_boot: int = 10000, seed: int = 0) -> dict:
    """mean(a) / mean(b) of two artifacts' per-window mean KL on the same windows, with a paired
    bootstrap percentile interval (Efron and Tibshirani, "An Introduction to the Bootstrap",
    1993, ch. 13): windows are resampled with replacement, the same windows for both sides, so
    what the windows share (hard text is hard for both files) cancels. Deterministic (``seed``).
    Tokens inside a window are not independent, so windows, not tokens, are resampled: with few
    windows the interval is wide, and that is the honest answer."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise EvalError(f"paired_ratio needs the same windows on both sides (at least 2), got {a.shape} and {b.shape}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    num, den = a[idx].mean(axis=1), b[idx].mean(axis=1)
    ratios = np.divide(num, den, out=np.full_like(num, np.inf), where=den > 0)
    lo, hi = np.percentile(ratios, [50 * (1 - level), 50 * (1 + level)])
    return {"ratio": float(a.mean() / b.mean()) if b.mean() > 0 else float("inf"), "lo": float(lo), "hi": float(hi),
            "level": level, "windows": int(len(a))}


def resolved(ci: dict | None, limit: float) -> bool:
    """Whether a ``paired_ratio`` interval tells its ratio from ``limit``: False when the interval
    holds the limit (the windows allow either side of it); True without an interval."""
    return ci is None or not ci["lo"] <= limit <= ci["hi"]
