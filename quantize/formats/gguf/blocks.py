"""Packing weights into GGML's block types, byte for byte as ``ggml-common.h`` lays them out.

Two paths:

- ``pack_exact``: a ``QuantizedTensor`` whose codes a GGUF type can hold as they are. Symmetric
  int4 / int8 with groups of 32, 64, 128, 256 or per channel become Q4_0 / Q8_0 bit for bit
  (a group of 64 is two blocks of 32 with the same fp16 scale; a channel is cols/32 blocks with
  the row's scale). Asymmetric int4 becomes Q4_1 with ``d = scale`` and ``m = -scale * zero``:
  exact except that ``m`` is rounded to fp16 (Q4_1 stores it so), at most half an fp16 ulp of m.
- ``pack_float``: fp32 weights into F32 / F16 / BF16 or a legacy block type, with the ``gguf``
  package's reference quantizers (the same arithmetic as llama.cpp's ``quantize_row_*_ref``).

Every function returns a uint8 array of shape (rows, bytes per row); all-zero bytes decode to
zero in every type used here, which is how padded vocabulary rows and placeholders are written.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants as gq

from quantize.qtensor import QuantizedTensor

FLOAT_TYPES = {T.F32: np.float32, T.F16: np.float16}
LEGACY_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def row_bytes(qtype: T, cols: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{cols} columns do not split into {qtype.name} blocks of {block}")
    return cols // block * size


def exact_type(qt: QuantizedTensor) -> T | None:
    """The GGUF type that holds ``qt``'s codes and scales unchanged, or None."""
    s = qt.scheme
    if qt.cols % 32 or qt.group_size % 32 or qt.scales.shape[0] != qt.rows:
        return None
    if s.type == "int4":
        return T.Q4_0 if s.symmetric else T.Q4_1
    if s.type == "int8" and s.symmetric:
        return T.Q8_0
    return None


def _block_scales(qt: QuantizedTensor) -> np.ndarray:
    """fp16 scale of every 32-column block: each group's scale repeated over its blocks."""
    reps = qt.group_size // 32
    return np.repeat(qt.scales.to(torch.float16).numpy(), reps, axis=1)  # (rows, cols/32)


def _fp16_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(*a.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) values 0..15 -> (rows, nb, 16) bytes: element j low, element j+16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def pack_exact(qt: QuantizedTensor, qtype: T) -> np.ndarray:
    if exact_type(qt) != qtype:
        raise ValueError(f"{qt.name}: {qt.scheme.label()} cannot be written as {qtype.name} without re-quantizing")
    rows, nb = qt.rows, qt.cols // 32
    d = _fp16_bytes(_block_scales(qt))  # (rows, nb, 2)
    codes = qt.codes.numpy().reshape(rows, nb, 32)
    if qtype == T.Q8_0:
        body = codes.astype(np.int8).view(np.uint8)
        return np.concatenate([d, body], axis=2).reshape(rows, nb * 34)
    if qtype == T.Q4_0:
        q = (codes.astype(np.int16) + 8).astype(np.uint8)
        return np.concatenate([d, _nibbles(q)], axis=2).reshape(rows, nb * 18)
    # Q4_1: value = d * q + m, ours = (q - z) * s  ->  d = s, m = -s * z (rounded to fp16)
    reps = qt.group_size // 32
    z = np.repeat(qt.zero_points.numpy().astype(np.float32), reps, axis=1)
    s = _block_scales(qt).astype(np.float32)
    m = _fp16_bytes(-s * z)
    q = codes.astype(np.uint8)
    return np.concatenate([d, m, _nibbles(q)], axis=2).reshape(rows, nb * 20)


def pack_float(w: np.ndarray, qtype: T) -> np.ndarray:
    """fp32 (rows, cols) -> bytes of ``qtype`` (F32, F16, BF16 or a legacy block type)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows = w.shape[0]
    if qtype == T.F32:
        return w.view(np.uint8).reshape(rows, -1)
    if qtype == T.F16:
        return w.astype(np.float16).view(np.uint8).reshape(rows, -1)
    if qtype in (T.BF16, *LEGACY_TYPES):
        out = gq.quantize(w, qtype)
        return np.ascontiguousarray(out).view(np.uint8).reshape(rows, -1)
    raise ValueError(f"pack_float does not handle {qtype.name}")
