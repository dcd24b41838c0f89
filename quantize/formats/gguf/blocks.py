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


def _fp16_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(*a.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) values 0..15 -> (rows, nb, 16) bytes: element j low, element j+16 high."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


CHUNK_ELEMENTS = 1 << 24  # rows are packed in chunks of about this many values (bounded temporaries)


def pack_exact(qt: QuantizedTensor, qtype: T) -> np.ndarray:
    if exact_type(qt) != qtype:
        raise ValueError(f"{qt.name}: {qt.scheme.label()} cannot be written as {qtype.name} without re-quantizing")
    rows, nb = qt.rows, qt.cols // 32
    out = np.empty((rows, row_bytes(qtype, qt.cols)), np.uint8)
    step = max(1, CHUNK_ELEMENTS // qt.cols)
    reps = qt.group_size // 32
    for r0 in range(0, rows, step):
        sl = slice(r0, r0 + step)
        n = out[sl].shape[0]
        s16 = np.repeat(qt.scales[sl].to(torch.float16).numpy(), reps, axis=1)  # (n, nb) block scales
        d = _fp16_bytes(s16)
        codes = qt.codes[sl].numpy().reshape(n, nb, 32)
        if qtype == T.Q8_0:
            body = [codes.astype(np.int8).view(np.uint8)]
        elif qtype == T.Q4_0:
            body = [_nibbles((codes.astype(np.int16) + 8).astype(np.uint8))]
        else:  # Q4_1: value = d * q + m, ours = (q - z) * s  ->  d = s, m = -s * z (rounded to fp16)
            z = np.repeat(qt.zero_points[sl].numpy().astype(np.float32), reps, axis=1)
            body = [_fp16_bytes(-s16.astype(np.float32) * z), _nibbles(codes.astype(np.uint8))]
        out[sl] = np.concatenate([d, *body], axis=2).reshape(n, -1)
    return out


def pack_float(w: np.ndarray, qtype: T) -> np.ndarray:
    """fp32 (rows, cols) -> bytes of ``qtype`` (F32, F16, BF16 or a legacy block type), in row chunks."""
    rows, cols = w.shape
    if qtype not in FLOAT_TYPES and qtype not in (T.BF16, *LEGACY_TYPES):
        raise ValueError(f"pack_float does not handle {qtype.name}")
    out = np.empty((rows, row_bytes(qtype, cols)), np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        x = np.ascontiguousarray(w[r0:r0 + step], dtype=np.float32)
        if qtype in FLOAT_TYPES:
            enc = x.astype(FLOAT_TYPES[qtype])
        else:
            enc = gq.quantize(x, qtype)  # gguf's reference quantizer (llama.cpp's quantize_row_*_ref)
        out[r0:r0 + x.shape[0]] = np.ascontiguousarray(enc).view(np.uint8).reshape(x.shape[0], -1)
    return out
