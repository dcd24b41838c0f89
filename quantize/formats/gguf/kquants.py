"""K-quant encoding for the GGUF writer (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): ggml's own quantizer.

The ``gguf`` package only decodes K-quants, so blocks come from ``ggml_quantize_chunk`` in the
libggml that llama-cpp-python ships (``ggml_quants``): the bytes llama.cpp's ``llama-quantize``
writes for the same float weights and importance vector (its imatrix). With importance that is
``quantize_row_q4_K_impl`` and friends (``make_qkx3_quants`` scale search, ``make_qp_quants``
super-block scales); without, ggml's reference quantizers, of which Q4_K and Q5_K (the per-layer
table's type in recipes/int4.yaml, most of a Q4_K_M mix) run in ``kquant_kernels``: the same
search compiled by numba across many sub-blocks at once, the same values to the bit, about 5x
faster per core. Rows are quantized on ``torch.get_num_threads()`` threads (the process's one
thread knob); the bytes do not depend on it.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from quantize.formats.gguf import kquant_kernels
from quantize.formats.gguf.ggml_quants import quantize_rows

QK_K = 256
BYTES = {t: GGML_QUANT_SIZES[t][1] for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)}  # per super-block of QK_K


def compiled(qtype: T, weighted: bool) -> bool:
    """Whether ``encode_kquant`` encodes ``qtype`` (with importance when ``weighted``) in
    ``kquant_kernels`` rather than in ggml's reference code, several times slower."""
    return not weighted and qtype in kquant_kernels.PARAMS


def encode_kquant(w: np.ndarray, qtype: T, importance: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """fp32 (rows, cols) with cols % 256 == 0 -> uint8 (rows, cols / 256 * block bytes).

    ``importance``: optional per-column weights (length cols), e.g. mean squared activations.
    ``threads``: default ``torch.get_num_threads()``."""
    if qtype not in BYTES:
        raise ValueError(f"encode_kquant handles {', '.join(t.name for t in BYTES)}, not {qtype.name}")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32).reshape(-1)
        if not (np.isfinite(importance).all() and (importance >= 0).all()):
            raise ValueError("importance must be finite and non-negative (mean squared activations)")
    threads = threads or torch.get_num_threads()
    if compiled(qtype, importance is not None):
        return kquant_kernels.encode(w, qtype, threads=threads)
    return quantize_rows(w, qtype, importance, threads=threads)
