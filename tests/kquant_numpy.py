"""The numpy Q4_K / Q5_K / Q6_K encoder the GGUF writer used before it called ggml's own quantizer
(quantize/formats/gguf/kquants.py at commit 8d56f78), kept verbatim below this paragraph only as
the "before" of two comparisons: tests/test_gguf.py checks that ggml's importance-weighted error
is no larger than this encoder's on every tensor, and bench/kquant_speed.py times both.

Original description:
Our own Q4_K, Q5_K and Q6_K encoder (the ``gguf`` package only decodes K-quants).

Vectorised numpy over all super-blocks of a chunk of rows; follows llama.cpp's ``ggml-quants.c``:

- Q4_K / Q5_K (``make_qkx2_quants``): each 32-value sub-block gets a scale and a min chosen by a
  grid search over candidate scales, each refined by weighted least squares; the 8 scales and 8
  mins of a 256-value super-block are then stored as 6-bit integers times fp16 ``d`` / ``dmin``,
  and the values are re-rounded against those stored scales.
- Q6_K (``make_qx_quants``): 16-value sub-blocks, symmetric codes in [-32, 31], a search over 19
  scales refined by weighted least squares; int8 sub-block scales times fp16 ``d``.

Importance: without statistics the weights are llama.cpp's defaults (``av_x + |x|`` for Q4_K /
Q5_K, ``x^2`` for Q6_K); with per-input-column statistics (mean x^2 from calibration, as in
llama.cpp's imatrix) each value's weight is ``imp[col] * sqrt(sigma2 + x^2)`` as in
``quantize_row_q4_K_impl``. Block layouts are checked against ``gguf.quants.dequantize`` in the
tests.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

QK_K = 256
CHUNK_ELEMENTS = 1 << 22  # rows are encoded in chunks of about this many values (bounded memory)
BYTES = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}


def _round(x: np.ndarray) -> np.ndarray:
    # llama.cpp's nearest_int rounds half away from zero... in practice (float magic) half to even;
    # ties are measure-zero for real weights, np.rint is half to even like the magic-number trick.
    return np.rint(x)


def _weights(x: np.ndarray, imp: np.ndarray | None, kind: str) -> np.ndarray:
    """x: (nb, nsub, sub). Per-value weights for the scale search."""
    if imp is not None:
        sigma2 = 2.0 * np.mean(x.reshape(x.shape[0], -1) ** 2, axis=1)[:, None, None]
        return imp * np.sqrt(sigma2 + x * x)
    if kind == "q6":
        return x * x
    av_x = np.sqrt(np.mean(x * x, axis=2, keepdims=True))
    return av_x + np.abs(x)


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Scale and (positive) min per sub-block: x, w (..., n). Returns scale, minus_min."""
    mn = np.minimum(x.min(axis=-1), 0.0)
    mx = x.max(axis=-1)
    rng = mx - mn
    safe = np.where(rng > 0, rng, 1.0)
    sum_w = w.sum(axis=-1)
    sum_x = (w * x).sum(axis=-1)

    sum_x2 = (w * x * x).sum(axis=-1)

    def fit(iscale):
        L = np.clip(_round(iscale[..., None] * (x - mn[..., None])), 0, nmax)
        wl = w * L
        sum_l = wl.sum(axis=-1)
        sum_l2 = (wl * L).sum(axis=-1)
        sum_xl = (wl * x).sum(axis=-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        Dsafe = np.where(D > 0, D, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / Dsafe
        m = (sum_l2 * sum_x - sum_l * sum_xl) / Dsafe
        pos = m > 0
        l2safe = np.where(sum_l2 > 0, sum_l2, 1.0)
        scale = np.where(pos, sum_xl / l2safe, scale)
        m = np.where(pos, 0.0, m)
        ok = D > 0
        # sum w (scale*L + m - x)^2, expanded so that no further pass over the values is needed
        err = (scale * scale * sum_l2 + 2 * scale * m * sum_l - 2 * scale * sum_xl
               + m * m * sum_w - 2 * m * sum_x + sum_x2)
        return ok, scale, m, err

    # the plain min/max grid point, as llama.cpp starts from it
    scale0 = rng / nmax
    m0 = mn
    L0 = np.clip(_round((x - mn[..., None]) / np.where(scale0 > 0, scale0, 1.0)[..., None]), 0, nmax)
    best_err = (w * (scale0[..., None] * L0 + m0[..., None] - x) ** 2).sum(axis=-1)
    best_scale, best_min = scale0, m0
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / safe
        ok, scale, m, err = fit(iscale)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, m, best_min)
    flat = rng <= 0
    best_scale = np.where(flat, 0.0, best_scale)
    best_min = np.where(flat, mn, best_min)
    return best_scale, -best_min


def _qx(x: np.ndarray, w: np.ndarray, nmax: int) -> np.ndarray:
    """Signed scale per sub-block (make_qx_quants with rmse_type 1): x, w (..., n)."""
    idx = np.abs(x).argmax(axis=-1)
    mx = np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
    zero = np.abs(mx) < 1e-15
    mxs = np.where(zero, 1.0, mx)
    best_scale = np.zeros_like(mx)
    best = np.full_like(mx, -np.inf)
    for i in range(-9, 10):
        iscale = -(nmax + 0.1 * i) / mxs
        L = np.clip(_round(iscale[..., None] * x), -nmax, nmax - 1)
        sumlx = (w * x * L).sum(axis=-1)
        suml2 = (w * L * L).sum(axis=-1)
        s2 = np.where(suml2 > 0, suml2, 1.0)
        score = np.where(suml2 > 0, sumlx * sumlx / s2, -np.inf)
        better = score > best
        best = np.where(better, score, best)
        best_scale = np.where(better, sumlx / s2, best_scale)
    return np.where(zero, 0.0, best_scale)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(nb, 8) 6-bit scales and mins -> (nb, 12) bytes (get_scale_min_k4's inverse)."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _encode_k45(x: np.ndarray, imp: np.ndarray | None, nmax: int) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 8, 32)
    w = _weights(xs, None if imp is None else imp.reshape(nb, 8, 32), "k")
    if nmax == 15:
        scale, mins = _qkx2(xs, w, 15, -1.0, 0.1, 20)
    else:
        scale, mins = _qkx2(xs, w, 31, -0.5, 0.1, 15)
    max_scale = scale.max(axis=1)
    max_min = mins.max(axis=1)
    inv_s = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1), 0.0)
    inv_m = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1), 0.0)
    ls = np.minimum(63, _round(inv_s[:, None] * scale)).astype(np.int32)
    lm = np.minimum(63, _round(inv_m[:, None] * mins)).astype(np.int32)
    d = _f16(max_scale / 63.0)
    dmin = _f16(max_min / 63.0)
    dj = d.astype(np.float32)[:, None] * ls
    dm = dmin.astype(np.float32)[:, None] * lm
    L = np.clip(_round((xs + dm[..., None]) / np.where(dj > 0, dj, 1.0)[..., None]), 0, nmax)
    L = np.where(dj[..., None] > 0, L, 0).astype(np.uint8).reshape(nb, 4, 2, 32)  # (chunk of 64, half, l)
    head = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), _pack_scales_k4(ls, lm)], axis=1)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    if nmax == 15:
        return np.concatenate([head, qs], axis=1)
    hi = (L >> 4).astype(np.uint8)  # (nb, 4, 2, 32)
    shifts = (2 * np.arange(4)[:, None] + np.arange(2)[None, :]).astype(np.uint8)  # bit 2c + half
    qh = (hi << shifts[None, :, :, None]).sum(axis=(1, 2)).astype(np.uint8)  # (nb, 32)
    return np.concatenate([head, qh, qs], axis=1)


def _encode_q6(x: np.ndarray, imp: np.ndarray | None) -> np.ndarray:
    nb = x.shape[0]
    xs = x.reshape(nb, 16, 16)
    w = _weights(xs, None if imp is None else imp.reshape(nb, 16, 16), "q6")
    scale = _qx(xs, w, 32)
    idx = np.abs(scale).argmax(axis=1)
    max_scale = np.take_along_axis(scale, idx[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < 1e-15
    iscale = np.where(zero, 0.0, -128.0 / np.where(zero, 1.0, max_scale))
    d = _f16(np.where(zero, 0.0, 1.0 / np.where(iscale == 0, 1.0, iscale)))
    sc = np.clip(np.minimum(127, _round(iscale[:, None] * scale)), -128, 127).astype(np.int8)
    dj = d.astype(np.float32)[:, None] * sc
    L = np.clip(_round(xs / np.where(dj != 0, dj, 1.0)[..., None]), -32, 31) + 32
    L = np.where(dj[..., None] != 0, L, 32).astype(np.uint8).reshape(nb, 2, 4, 32)  # (half, quarter, l)
    q1, q2, q3, q4 = L[:, :, 0], L[:, :, 1], L[:, :, 2], L[:, :, 3]
    ql = np.concatenate([(q1 & 0xF) | ((q3 & 0xF) << 4), (q2 & 0xF) | ((q4 & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d[:, None].view(np.uint8)], axis=1)


def encode_kquant(w: np.ndarray, qtype: T, importance: np.ndarray | None = None) -> np.ndarray:
    """fp32 (rows, cols) with cols % 256 == 0 -> uint8 (rows, cols / 256 * block bytes).

    ``importance``: optional per-column weights (length cols), e.g. mean squared activations."""
    if qtype not in BYTES:
        raise ValueError(f"encode_kquant handles Q4_K, Q5_K, Q6_K, not {qtype.name}")
    rows, cols = w.shape
    if cols % QK_K:
        raise ValueError(f"{cols} columns do not split into {qtype.name} super-blocks of {QK_K}")
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape[0] != cols:
            raise ValueError(f"importance has {importance.shape[0]} entries for {cols} columns")
    nbr = cols // QK_K
    out = np.empty((rows, nbr * BYTES[qtype]), np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        x = np.asarray(w[r0:r0 + step], dtype=np.float32)
        n = x.shape[0]
        xb = x.reshape(n * nbr, QK_K)
        imp = None if importance is None else np.broadcast_to(importance.reshape(1, nbr, QK_K), (n, nbr, QK_K)).reshape(n * nbr, QK_K)
        if qtype == T.Q6_K:
            enc = _encode_q6(xb, imp)
        else:
            enc = _encode_k45(xb, imp, 15 if qtype == T.Q4_K else 31)
        out[r0:r0 + n] = enc.reshape(n, -1)
    return out
