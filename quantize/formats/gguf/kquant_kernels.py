"""ggml's plain Q4_K and Q5_K encoders (no importance), compiled by numba and run on many
sub-blocks at once: the bytes ``ggml_quantize_chunk`` writes, at a fraction of its time.

Without importance ggml runs ``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref``: per
32-value sub-block, weights ``av_x + |x|`` and ``make_qkx2_quants``' search over 21 / 16 trial
scales (a weighted least-squares scale and offset per trial, the lowest weighted error kept);
then per 256-value super-block fp16 ``d`` / ``dmin``, 6-bit scales and mins, and the levels
rounded again from those. Each sub-block's sums are added in a fixed order, so a compiler may not
vectorize ggml's loops over a sub-block (that reorders float additions), and its reference code
runs at 45.8 ns per value on one core here (AVX512 CPU, 2026-12-03; libggml-base is built for
baseline x86-64). Here ``LANES`` sub-blocks are searched side by side: every step is one
operation across them, each sub-block's sums still taken in ggml's order, with no fused
multiply-add (numba does not contract without ``fastmath``), so the loops vectorize and every
value is ggml's to the bit.

The kernels index one state array per group with the lane count passed at run time: with a
constant trip count LLVM unrolls the lane loop and its straight-line vectorizer gives up on the
possible aliasing; a loop of unknown length gets runtime alias checks and vector code.

Where the bytes may differ from ggml's, the values they decode to do not:
- a sub-block whose scale in the file is 0 (``d`` rounds to 0 in fp16, or its 6-bit scale is
  0): ggml skips its levels and leaves whatever its stack buffer held (the previous super-block's
  levels, or uninitialised memory for the first one of a call); here they are 0. Every level of
  such a sub-block decodes to ``-dmin * m``.
ggml's rounding (``nearest_int``: add 1.5 * 2^23 and read the mantissa) equals round-half-even
for |v| <= 4194303 and returns garbage beyond; a super-block whose search or final rounding
leaves that range (only pathological data does) is flagged, and its row is encoded by ggml.

Imports: numpy, numba and ``quantize.formats.gguf.ggml_quants`` (that fallback).
"""
from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType as T

from quantize.formats.gguf.ggml_quants import for_row_chunks, quantize_rows

QK_K = 256
SUB = 32
# Sub-blocks searched side by side: 128 took 6 ns per value for the search, 16 took 13.6 and 256
# or 512 7-8 (the group's state, 112 x LANES floats, leaves the L1 cache).
LANES = 128
CHUNK_ELEMENTS = 1 << 20  # values per kernel call and thread: 4 MiB of fp32
# (levels' maximum, make_qkx2_quants' rmin, rdelta, nstep, block bytes) as ggml's *_ref calls it
PARAMS = {
    T.Q4_K: (15, -1.0, 0.1, 20, 144),
    T.Q5_K: (31, -0.5, 0.1, 15, 176),
}
NEAREST_INT_LIMIT = 4194303.0

# rows of a group's state array (each LANES wide): per-sub-block scalars, then its 32 values,
# weights and trial levels
_MN, _MX, _MN0, _SW, _SX, _SC, _BE, _SL, _SL2, _SXL, _ISC, _CE, _TSC, _TMN, _ACC, _BIG = range(16)
_X0, _W0, _L0 = 16, 16 + SUB, 16 + 2 * SUB
_ROWS = 16 + 3 * SUB


@numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
def _search(x, scales, mins, bad, lanes, nmax, rmin, rdelta, nstep):  # pragma: no cover - compiled
    """make_qkx2_quants with ggml's *_ref weights on every (32,) row of ``x`` (float32):
    ``scales[s]`` the scale, ``mins[s]`` ggml's ``the_min`` (minus the offset); ``bad[s]`` set
    where a rounding argument left nearest_int's exact range. ``lanes`` sub-blocks at a time."""
    n_sub = x.shape[0]
    a = np.empty((_ROWS, lanes), np.float32)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    c32 = np.float32(32.0)
    lim = np.float32(NEAREST_INT_LIMIT)
    for g in range(0, n_sub, lanes):
        m = min(lanes, n_sub - g)
        for k in range(m):
            for i in range(SUB):
                a[_X0 + i, k] = x[g + k, i]
        # weights: av_x + |x|, av_x = sqrt(sum x^2 / 32), the sum in ggml's order
        for k in range(m):
            a[_SL, k] = zero
            a[_BIG, k] = zero
        for i in range(SUB):
            for k in range(m):
                a[_SL, k] += a[_X0 + i, k] * a[_X0 + i, k]
        for k in range(m):
            a[_SL, k] = np.sqrt(a[_SL, k] / c32)
        for i in range(SUB):
            for k in range(m):
                a[_W0 + i, k] = a[_SL, k] + abs(a[_X0 + i, k])
        # make_qkx2_quants: min, max, sum_w, sum_x
        for k in range(m):
            a[_MN, k] = a[_X0, k]
            a[_MX, k] = a[_X0, k]
            a[_SW, k] = a[_W0, k]
            a[_SX, k] = a[_W0, k] * a[_X0, k]
        for i in range(1, SUB):
            for k in range(m):
                v = a[_X0 + i, k]
                a[_MN, k] = v if v < a[_MN, k] else a[_MN, k]
                a[_MX, k] = v if v > a[_MX, k] else a[_MX, k]
                a[_SW, k] += a[_W0 + i, k]
                a[_SX, k] += a[_W0 + i, k] * v
        for k in range(m):
            mn = a[_MN, k]
            mn = zero if mn > zero else mn
            a[_MN, k] = mn
            a[_MN0, k] = mn
            a[_ISC, k] = nmax / (a[_MX, k] - mn)
            a[_SC, k] = one / a[_ISC, k]
            a[_BE, k] = zero
        # the first guess's error (its levels are not kept: the caller rounds again)
        for i in range(SUB):
            for k in range(m):
                f = a[_ISC, k] * (a[_X0 + i, k] - a[_MN, k])
                a[_BIG, k] = max(a[_BIG, k], abs(f))
                lv = min(max(np.rint(f), zero), nmax)
                d = a[_SC, k] * lv + a[_MN, k] - a[_X0 + i, k]
                a[_BE, k] += a[_W0 + i, k] * (d * d)
        for s in range(nstep + 1):
            fs = rmin + rdelta * np.float32(s) + nmax
            for k in range(m):
                a[_ISC, k] = fs / (a[_MX, k] - a[_MN, k])
                a[_SL, k] = zero
                a[_SL2, k] = zero
                a[_SXL, k] = zero
                a[_CE, k] = zero
            for i in range(SUB):
                for k in range(m):
                    xv = a[_X0 + i, k]
                    f = a[_ISC, k] * (xv - a[_MN, k])
                    a[_BIG, k] = max(a[_BIG, k], abs(f))
                    lv = min(max(np.rint(f), zero), nmax)
                    a[_L0 + i, k] = lv
                    w = a[_W0 + i, k]
                    a[_SL, k] += w * lv
                    a[_SL2, k] += w * lv * lv
                    a[_SXL, k] += w * lv * xv
            for k in range(m):
                sw = a[_SW, k]
                sx = a[_SX, k]
                sl = a[_SL, k]
                sl2 = a[_SL2, k]
                sxl = a[_SXL, k]
                dd = sw * sl2 - sl * sl
                t_s = (sw * sxl - sx * sl) / dd
                t_m = (sl2 * sx - sl * sxl) / dd
                pos = t_m > zero
                a[_TMN, k] = zero if pos else t_m
                a[_TSC, k] = sxl / sl2 if pos else t_s
                a[_ACC, k] = one if dd > zero else zero
            for i in range(SUB):
                for k in range(m):
                    d = a[_TSC, k] * a[_L0 + i, k] + a[_TMN, k] - a[_X0 + i, k]
                    a[_CE, k] += a[_W0 + i, k] * (d * d)
            for k in range(m):
                better = a[_ACC, k] != zero and a[_CE, k] < a[_BE, k]
                a[_BE, k] = a[_CE, k] if better else a[_BE, k]
                a[_SC, k] = a[_TSC, k] if better else a[_SC, k]
                a[_MN, k] = a[_TMN, k] if better else a[_MN, k]
        for k in range(m):
            if a[_MX, k] != a[_MN0, k]:
                scales[g + k] = a[_SC, k]
                mins[g + k] = -a[_MN, k]
                bad[g + k] = not (a[_BIG, k] <= lim)
            else:  # max == min: ggml returns before any rounding
                scales[g + k] = zero
                mins[g + k] = -a[_MN0, k]
                bad[g + k] = False


@numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
def _super_max(scales, mins, max_scale, max_min):  # pragma: no cover - compiled
    """Per super-block (rows of the (blocks, 8) arrays): ggml's running maxima from 0."""
    zero = np.float32(0.0)
    for b in range(scales.shape[0]):
        ms = zero
        mm = zero
        for j in range(QK_K // SUB):
            if scales[b, j] > ms:
                ms = scales[b, j]
            if mins[b, j] > mm:
                mm = mins[b, j]
        max_scale[b] = ms
        max_min[b] = mm


@numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
def _levels(x, scales, mins, inv_scale, inv_min, d, dmin, out, bad, nmax, five_bits, n32):  # pragma: no cover - compiled
    """Bytes 4.. of each super-block (row of ``x``, (blocks, 256)): the packed 6-bit scales and
    mins, then (Q5_K) the high bits and the low nibbles of the levels, rounded from the file's
    own scales; ``bad[b]`` set where a rounding argument left nearest_int's exact range.
    ``n32``: 32, passed at run time so that the level loop vectorizes (see the module)."""
    zero = np.float32(0.0)
    lim = np.float32(NEAREST_INT_LIMIT)
    lv = np.empty(QK_K, np.int32)
    f = np.empty(n32, np.float32)
    ls = np.empty(8, np.int32)
    lm = np.empty(8, np.int32)
    for b in range(x.shape[0]):
        o = out[b]
        flag = False
        for j in range(8):
            v = inv_scale[b] * scales[b, j]
            flag = flag or not (abs(v) <= lim)
            q = np.int32(np.rint(v)) & 0xFF  # ggml stores nearest_int's int into a uint8_t
            ls[j] = 63 if q > 63 else q
            v = inv_min[b] * mins[b, j]
            flag = flag or not (abs(v) <= lim)
            q = np.int32(np.rint(v)) & 0xFF
            lm[j] = 63 if q > 63 else q
        for j in range(12):
            o[4 + j] = 0
        for j in range(8):
            if j < 4:
                o[4 + j] = ls[j]
                o[4 + j + 4] = lm[j]
            else:
                o[4 + j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
                o[4 + j - 4] |= (ls[j] >> 4) << 6
                o[4 + j] |= (lm[j] >> 4) << 6
        for j in range(8):
            dj = d[b] * np.float32(ls[j])
            if dj == zero:  # ggml skips the sub-block (see the module): 0 here
                for i in range(SUB):
                    lv[SUB * j + i] = 0
                continue
            dm = dmin[b] * np.float32(lm[j])
            for i in range(n32):
                f[i] = (x[b, SUB * j + i] + dm) / dj
            for i in range(n32):
                flag = flag or not (abs(f[i]) <= lim)
                lv[SUB * j + i] = np.int32(min(max(np.rint(f[i]), zero), nmax))
        bad[b] = flag
        if five_bits:
            for j in range(32):
                o[16 + j] = 0
            m1 = 1
            m2 = 2
            for n in range(0, QK_K, 64):
                for j in range(32):
                    l1 = lv[n + j]
                    if l1 > 15:
                        l1 -= 16
                        o[16 + j] |= m1
                    l2 = lv[n + j + 32]
                    if l2 > 15:
                        l2 -= 16
                        o[16 + j] |= m2
                    o[48 + n // 2 + j] = l1 | (l2 << 4)
                m1 <<= 2
                m2 <<= 2
        else:
            for n in range(0, QK_K, 64):
                for j in range(32):
                    o[16 + n // 2 + j] = lv[n + j] | (lv[n + j + 32] << 4)


def _encode_chunk(x: np.ndarray, qtype: T, lanes: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) fp32 -> (bytes (rows, cols / 256 * block), rows ggml must redo)."""
    nmax, rmin, rdelta, nstep, size = PARAMS[qtype]
    rows, cols = x.shape
    blocks = x.reshape(-1, QK_K)
    nb = blocks.shape[0]
    scales = np.empty(nb * 8, np.float32)
    mins = np.empty(nb * 8, np.float32)
    bad_sub = np.empty(nb * 8, np.bool_)
    _search(blocks.reshape(-1, SUB), scales, mins, bad_sub, lanes, np.float32(nmax), np.float32(rmin),
            np.float32(rdelta), nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = np.empty(nb, np.float32)
    max_min = np.empty(nb, np.float32)
    _super_max(scales, mins, max_scale, max_min)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63.0) / max_scale, np.float32(0.0)).astype(np.float32)
        inv_min = np.where(max_min > 0, np.float32(63.0) / max_min, np.float32(0.0)).astype(np.float32)
    # GGML_FP32_TO_FP16 rounds to nearest even, as numpy does
    d16 = (max_scale / np.float32(63.0)).astype(np.float16)
    dmin16 = (max_min / np.float32(63.0)).astype(np.float16)
    out = np.empty((nb, size), np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(nb, 2)
    bad = np.empty(nb, np.bool_)
    _levels(blocks, scales, mins, inv_scale, inv_min, d16.astype(np.float32), dmin16.astype(np.float32), out, bad,
            np.float32(nmax), qtype == T.Q5_K, SUB)
    bad |= bad_sub.reshape(nb, 8).any(1)
    per_row = cols // QK_K
    return out.reshape(rows, per_row * size), np.nonzero(bad.reshape(rows, per_row).any(1))[0]


def encode(w: np.ndarray, qtype: T, threads: int = 1, lanes: int = LANES) -> np.ndarray:
    """fp32-convertible (rows, cols), cols % 256 == 0 -> uint8 (rows, bytes per row) of ``qtype``
    (Q4_K or Q5_K), ggml's plain encoding (``ggml_quants.quantize_rows`` without importance);
    ``threads`` run chunks of rows side by side (the kernels release the GIL)."""
    if qtype not in PARAMS:
        raise ValueError(f"kquant_kernels encodes {', '.join(t.name for t in PARAMS)}, not {qtype.name}")
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"{cols} columns do not split into {qtype.name} blocks of {QK_K}")
    out = np.empty((rows, cols // QK_K * PARAMS[qtype][4]), np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)

    def run(r0: int) -> None:
        x = np.ascontiguousarray(w[r0:r0 + step], dtype=np.float32)
        packed, redo = _encode_chunk(x, qtype, lanes)
        if redo.size:  # out of nearest_int's exact range somewhere: ggml's own bytes for those rows
            packed[redo] = quantize_rows(x[redo], qtype)
        out[r0:r0 + x.shape[0]] = packed

    for_row_chunks(rows, step, threads, run)
    return out
