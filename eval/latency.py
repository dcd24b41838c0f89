"""Latency protocol shared by all backends.

For each prompt length L: ``warmup`` untimed runs, then ``repeats`` timed runs of
(1) prefill: empty cache, process L tokens, pick the greedy next token - this is the time to
first token, and ``L / t`` is the prefill rate; (2) decode: ``n_decode`` further greedy tokens
one at a time on top of that cache, ``n_decode / t`` is the decode rate. Medians of the repeats
are reported (with min and max), like llama-bench's averages but robust to one slow run on a
shared machine. Peak memory covers the timed runs only (the model's weights are resident
before, so they count as well).
"""
from __future__ import annotations

import logging
import statistics

import numpy as np
from tqdm import tqdm

from eval.errors import EvalError

log = logging.getLogger(__name__)

DEFAULT_PROMPT_LENGTHS = (64, 256)
DEFAULT_DECODE = 32


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def prompt_tokens(stream: np.ndarray, length: int, bos: int) -> list[int]:
    """The first ``length`` held-out tokens with ``<bos>`` in front (``length`` ids in all)."""
    if length < 1:
        raise EvalError(f"prompt length must be positive, got {length}")
    if len(stream) < length:
        raise EvalError(f"held-out text has {len(stream)} tokens, fewer than prompt length {length}")
    return [int(bos)] + [int(t) for t in stream[: length - 1]]


def measure(backend, stream: np.ndarray, bos: int, prompt_lengths=DEFAULT_PROMPT_LENGTHS,
            n_decode: int = DEFAULT_DECODE, repeats: int = 3, warmup: int = 1) -> dict:
    """Latency numbers for one backend (see module docstring)."""
    if repeats < 1 or warmup < 0 or n_decode < 1:
        raise EvalError(f"latency needs repeats >= 1, warmup >= 0, n_decode >= 1; got {repeats}, {warmup}, {n_decode}")
    runs = []
    backend.reset_peak_memory()
    total = len(prompt_lengths) * (repeats + warmup)
    with tqdm(total=total, desc="latency", unit="run", leave=False) as bar:
        for length in prompt_lengths:
            prompt = prompt_tokens(stream, length, bos)
            prefill_s, decode_s = [], []
            for i in range(warmup + repeats):
                backend.start_timer()
                nxt = backend.prefill(prompt)
                t_prefill = backend.stop_timer()
                backend.start_timer()
                backend.decode(nxt, n_decode)
                t_decode = backend.stop_timer()
                if i >= warmup:
                    prefill_s.append(t_prefill)
                    decode_s.append(t_decode)
                bar.update(1)
            p, d = _stats(prefill_s), _stats(decode_s)
            runs.append({
                "prompt_tokens": length,
                "decode_tokens": n_decode,
                "ttft_s": p,
                "decode_s": d,
                "prefill_tok_s": length / p["median"],
                "decode_tok_s": n_decode / d["median"],
            })
            log.info("L=%d: ttft %.4fs, prefill %.1f tok/s, decode %.1f tok/s", length, p["median"],
                     runs[-1]["prefill_tok_s"], runs[-1]["decode_tok_s"])
    return {"runs": runs, "repeats": repeats, "warmup": warmup, "memory": backend.peak_memory()}
