"""GPTQ (Frantar et al. 2022, arXiv 2210.17323, Algorithm 1) as a pure tensor function.

Weights (rows = outputs, cols = inputs) and the inputs' second moment ``H = E[x x^T]`` in;
a ``QuantizedTensor`` out whose codes sit in the same grid as RTN's (int4 / int8, symmetric or
not) with fp16 scales, so ``codes * scale`` is exactly what the fake-quantized model computes
and what GGUF Q4_0 / Q8_0 or compressed-tensors blocks hold.

Details:
- dampening: ``scheme.dampening * mean(diag H)`` added to the diagonal;
- dead columns (``diag H == 0``, inputs never active in calibration) get ``H[j, j] = 1`` so
  they are rounded to nearest and pass no error on (their weights are kept, not zeroed, since
  other data may use them);
- ``act_order``: columns processed by decreasing ``diag H``; group scales are computed first
  from the original column order ("static groups"), so the output is still a plain grouped
  layout (no ``g_idx``);
- without act-order, a group's scale is chosen when its first column is reached, from the
  weights as already updated by the error feedback (as in the reference implementation);
- lazy batch updates of ``scheme.block_size`` columns;
- with act-order (static groups) the column loop reads H's own (reversed) Cholesky factor and
  feeds back the original weights' rounding differences: the same algorithm without the
  triangular inverse that H^-1's factor costs (``_column_loop`` shows why);
- given the input rows instead of H (``GramRows``: fewer tokens than columns) and act-order,
  H is never formed: its factor is built in low-rank form (``_gptq_low_rank``);
- a Hessian that is not positive definite after dampening (or not finite) falls back to RTN
  for this tensor; ``info["fallback"]`` records why.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from quantize.errors import QuantizeError
from quantize.methods.rtn import as_rows, group_view, int_scales, quantize_rtn, symmetric_range
from quantize.methods.stats import GramRows
from quantize.qtensor import QuantizedTensor
from quantize.schemes import QuantScheme

log = logging.getLogger(__name__)


# Columns of a block whose feedback to each other is applied column by column with static
# groups (see _column_loop); between sub-blocks it is one matrix product.
SUB_BLOCK = 32


class HessianShapeError(QuantizeError):
    """The Hessian given for a tensor does not match its input width."""


def reverse_cholesky(h: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, int]:
    """R upper triangular with H = R R^T (the Cholesky factor of H in reversed column order), or
    with ``inverse`` U = R^-1, the upper Cholesky factor of H^-1 (H^-1 = U^T U) that the
    textbook's column loop reads; and 0 or, where H is not positive definite, the column
    (1-based) where its Cholesky failed. ``h`` (symmetric) is consumed: on the CPU its memory
    becomes the result's.

    With J the reversal permutation and J H J = M M^T (M lower), R = J M J and U = J M^-1 J. The
    reference implementation takes three n^3-order steps for U (chol(H), H^-1, chol(H^-1)); this
    takes one Cholesky (n^3/3 flops) and, for U, one triangular inverse (n^3/3): 16 s for an
    E4B down_proj here, of which the inverse is 7 s, and GPTQ with static groups needs only R
    (``_column_loop``). On the CPU both run in LAPACK in place (``spotrf``, ``strtri``), so
    no n x n matrix besides ``h`` is allocated (1 GiB for that down_proj); elsewhere torch's
    Cholesky of the flipped matrix and a triangular solve."""
    n = h.shape[0]
    if h.device.type == "cpu" and h.dtype == torch.float32 and h.is_contiguous():
        from scipy.linalg import lapack

        _reverse_both_axes_(h)
        a = h.numpy().T  # Fortran order over h's memory: J H J again, by symmetry
        c, info = lapack.spotrf(a, lower=1, overwrite_a=1, clean=1)
        if info != 0:
            return h, n - int(info) + 1  # the column in H's own order
        if inverse:
            c, info = lapack.strtri(c, lower=1, overwrite_c=1)
            if info != 0:
                return h, -1  # not reached: a successful Cholesky has a non-zero diagonal
        m = torch.from_numpy(c)  # M or M^-1, column-major: h's memory when LAPACK worked in place
        _reverse_both_axes_(m)
        return m, 0
    m, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        return m, n - int(info) + 1
    if inverse:
        eye = torch.eye(n, dtype=m.dtype, device=m.device)
        m = torch.linalg.solve_triangular(m, eye, upper=False)
        del eye
    return m.flip(0, 1), 0


def _reverse_both_axes_(t: torch.Tensor, chunk: int = 1 << 22) -> None:
    """J T J in place for a dense (row- or column-major) square matrix: element (i, j) moves to
    (n-1-i, n-1-j), which in either layout is the flat storage reversed; swapped in chunks."""
    v = t.numpy().reshape(-1, order="A")
    n = v.size
    half = n // 2
    for a in range(0, half, chunk):
        b = min(a + chunk, half)
        head = v[a:b].copy()
        v[a:b] = v[n - b:n - a][::-1]
        v[n - b:n - a] = head[::-1]


def _all_finite(t: torch.Tensor, rows: int = 1024) -> bool:
    """``torch.isfinite(t).all()``. First from the sum: an inf or NaN anywhere makes it inf or
    NaN (a sum has no operation that turns them finite again), so a finite sum settles it in one
    fast reduction (3 ms instead of 83 for a 2048 x 16384 matrix). A sum that is not finite may
    also be an overflow of finite values: then element by element, a block of rows at a time (on
    a whole float matrix ``isfinite`` makes a full-size float temporary (|t|) besides the bool
    one, +1.75 GiB on E4B's down_proj Hessian)."""
    if bool(torch.isfinite(t.sum())):
        return True
    return all(bool(torch.isfinite(t[a:a + rows]).all()) for a in range(0, t.shape[0], rows))


def _permute_symmetric_(h: torch.Tensor, perm: torch.Tensor, rows: int = 1024) -> None:
    """``h[perm][:, perm]`` written over ``h``: the columns a block of rows at a time (one block's
    temporary), then the rows along the permutation's cycles (one row's). Indexing in two steps
    would make a whole intermediate n x n copy."""
    for a in range(0, h.shape[0], rows):
        blk = h[a:a + rows]
        blk.copy_(blk.index_select(1, perm))
    src = perm.tolist()  # new row i is old row src[i]
    done = [False] * len(src)
    for start in range(len(src)):
        if done[start]:
            continue
        first = h[start].clone()
        i = start
        while True:  # each row is read (as h[j]) before the step that overwrites it
            done[i] = True
            j = src[i]
            if j == start:
                h[i] = first
                break
            h[i] = h[j]
            i = j


def gptq_quantize(name: str, weight: torch.Tensor, hessian: torch.Tensor | GramRows, scheme: QuantScheme,
                  consume: bool = False) -> QuantizedTensor:
    """GPTQ of one linear's weights; ``gptq_quantize_shared`` with a single tensor (see there)."""
    return gptq_quantize_shared([name], [weight], hessian, scheme, consume=consume)[0]


def gptq_quantize_shared(names: Sequence[str], weights: Sequence[torch.Tensor], hessian: torch.Tensor | GramRows,
                         scheme: QuantScheme, consume: bool = False) -> list[QuantizedTensor]:
    """GPTQ of linears that read the same input (one Hessian) under one scheme, in one pass over
    the columns: GPTQ treats each row on its own given H (the error feedback, the group scales
    and the loss are per row; act-order's permutation and the factor depend on H alone), so the
    weights' rows are stacked, quantized once, and split again: each result is the one its
    tensor alone would get, with one factorisation and one column loop instead of one per
    tensor. Measured on E4B's q/k/v shapes (2048 + 512 + 512 rows, 2048 columns, AVX2 CPU, 2
    threads, 2026-12-03): 0.68 s against 1.24 s one by one, the same codes; gate/up stacked
    (32768 rows) were slower, 5.5-5.7 s against 4.9-5.0 s (a working set twice the size per
    column), so the caller decides what to stack.

    ``hessian``: H itself, or the input rows it is the second moment of (``GramRows``, kept
    by the caller when there are far fewer tokens than columns). With rows and act-order, GPTQ
    never forms H: ``_low_rank_factor`` factors dampening plus x^T x / tokens in O(tokens^2 n)
    instead of Cholesky's n^3 / 3 (the same algorithm and codes up to float rounding); without
    act-order H is formed from the rows.

    ``consume``: the caller never reads ``hessian`` again (the last linear of a stage), so GPTQ
    works in its memory (permuted in place for act-order, then factored in place): no n x n copy.
    Measured at E4B's down_proj with act-order, 1.00 GiB beyond the inputs instead of 1.44
    (bench/results/gptq_speed.md; not the whole 1 GiB the copy takes, and the rest of the
    difference was not profiled; measured before the column loop worked on a transposed copy of
    the weights, which adds one weight matrix, 128 MiB there). Codes are the same either way."""
    if len(names) != len(weights) or not weights:
        raise ValueError(f"gptq_quantize_shared: {len(names)} names for {len(weights)} weight tensors")
    name = " + ".join(names)
    if scheme.type not in ("int4", "int8"):
        raise QuantizeError(f"{name}: GPTQ quantizes int4/int8 only, not {scheme.type!r}")
    parts = [as_rows(w) for w in weights]  # read only: the column loop's originals (no copy when already fp32)
    widths = {p.shape[1] for p in parts}
    if len(widths) != 1:
        raise HessianShapeError(f"{name}: one Hessian cannot serve input widths {sorted(widths)}")
    split = _Split(list(names), list(weights))
    orig = parts[0] if len(parts) == 1 else torch.cat(parts)
    del parts
    rows, cols = orig.shape
    if isinstance(hessian, GramRows):
        if hessian.x.dim() != 2 or hessian.x.shape[1] != cols:
            raise HessianShapeError(f"{name}: Hessian input rows of shape {tuple(hessian.x.shape)} do not match {cols} input columns")
        if scheme.act_order:
            return _gptq_low_rank(split, orig, hessian.x.to(device=orig.device, dtype=torch.float32), scheme)
        hessian, consume = hessian.dense(), True
    w = orig  # only read until the working copy is made below (permuted or not)
    if tuple(hessian.shape) != (cols, cols):
        raise HessianShapeError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match {cols} input columns")
    # Unless consumed, the caller's Hessian is only read (q/k/v and gate/up share one): GPTQ works
    # on one copy of it, permuted or not, so two n x n matrices are alive here, not three.
    h_in = hessian.detach().to(device=w.device, dtype=torch.float32)
    if not _all_finite(h_in):
        return _fallback(split, scheme, torch.diagonal(h_in), "hessian has non-finite entries")

    diag = torch.diagonal(h_in).clone()
    h_diag = diag.clone()  # the fallback's importance: the Hessian itself may be overwritten below
    in_place = consume or h_in.data_ptr() != hessian.data_ptr()  # consumed, or already a private copy
    dead = diag == 0
    diag[dead] = 1.0
    g_size = scheme.effective_group or cols
    group_view(w, g_size)  # validates divisibility with a clear message
    bits, sym = scheme.bits, scheme.symmetric

    perm = None
    scales, zeros = _group_scales(w, g_size, bits, sym, static=scheme.act_order)
    if scheme.act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
    h = h_in if in_place else h_in.clone()
    del h_in
    if perm is not None:
        _permute_symmetric_(h, perm)
        diag = diag[perm]
    h.diagonal().copy_(diag)  # dead columns: H[j, j] = 1
    del diag

    damp = scheme.dampening * torch.diagonal(h).mean()
    h.diagonal().add_(damp)
    # Static groups (act-order) read R and feed back the original weights' rounding differences;
    # dynamic groups choose each scale from partly updated weights, which only the textbook's
    # order of updates defines, so they read U = R^-1 (see _column_loop).
    static = perm is not None
    f, info = reverse_cholesky(h, inverse=not static)
    del h
    if info != 0:
        return _fallback(split, scheme, h_diag, f"hessian not positive definite (cholesky failed at column {info}) after dampening {scheme.dampening}")
    if not _all_finite(f):
        return _fallback(split, scheme, h_diag, "hessian's cholesky factor not finite")
    f_diag = f.diagonal().clone()
    if static:
        f.div_(f_diag)  # R[j, k] / R[k, k]
        loss_scale = f_diag
    else:
        f.mul_((-1.0 / f_diag).unsqueeze(1))  # -U[j, k] / U[j, j]
        loss_scale = 1.0 / f_diag

    block = scheme.block_size
    # The weights transposed, (cols, rows) in processing order: a block of columns is a contiguous
    # slice, updated in place, with no gather or transposed copy per block. Act-order keeps the
    # originals beside the working copy (static groups read them); without it the two are one.
    src = _transposed(orig, perm)
    w = src.clone() if perm is not None else src

    def prepare(i1: int, i2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return w[i1:i2], f[i1:i2, i1:i2].contiguous(), src[i1:i2]

    def finish(i1: int, i2: int, d1: torch.Tensor) -> None:
        if i2 < cols:  # the lazy update of all later columns (sec. 4.2)
            w[i2:].addmm_(f[i1:i2, i2:].t(), d1)

    codes_t, loss = _column_loop(prepare, finish, w, orig, loss_scale, scales, zeros, perm, g_size, bits, block)
    del f
    return _result(split, scheme, codes_t, loss, scales, zeros, perm, dead)


def _group_scales(w: torch.Tensor, g_size: int, bits: int, sym: bool,
                  static: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fp16 scales (and uint8 zero points) GPTQ fills: with static groups (act-order) from the
    original weights before any error feedback; otherwise zeros, chosen in the column loop."""
    rows, cols = w.shape
    scales = torch.zeros(rows, cols // g_size, dtype=torch.float16, device=w.device)
    zeros = None if sym else torch.zeros(rows, cols // g_size, dtype=torch.uint8, device=w.device)
    if static:
        s0, z0 = int_scales(group_view(w, g_size), bits, sym)
        scales.copy_(s0)
        if zeros is not None:
            zeros.copy_(z0)
    return scales, zeros


# Rows of ``w`` that ``_transposed`` moves at a time (see there).
TRANSPOSE_SLAB = 32


def _transposed(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """A new (cols, rows) copy of ``w`` (2-D, row-major) with its columns in processing order
    (``perm``, or as they are). A slab of ``TRANSPOSE_SLAB`` rows at a time: its columns gathered
    (contiguous rows, cache-sized), then written transposed into the result's columns. Whole-matrix
    ``w.t().contiguous()`` then a row gather walks memory a full row apart at every element and
    copies the matrix twice: 127 ms against 83 for an E4B down_proj's 2048 x 16384 (the weights
    and the inputs z each), 22 against 11 for the stacked q/k/v (AVX512 CPU, 2 threads,
    2026-12-03; a column gather of the whole row-major matrix is strided, and was 13% of a
    gate_proj's GPTQ when done per block). A copy: the same values whatever the slab."""
    rows = w.shape[0]
    out = torch.empty(w.shape[1], rows, dtype=w.dtype, device=w.device)
    if w.device.type != "cpu":  # one kernel each on a GPU, where launches cost more than strides
        out.copy_((w if perm is None else w.index_select(1, perm)).t())
        return out
    for r0 in range(0, rows, TRANSPOSE_SLAB):
        slab = w[r0:r0 + TRANSPOSE_SLAB]
        out[:, r0:r0 + slab.shape[0]].copy_((slab if perm is None else slab.index_select(1, perm)).t())
    return out


class _Split(NamedTuple):
    """Where the stacked rows of ``gptq_quantize_shared`` came from, in order: each tensor's
    name and its weight as given (its shape, its rows, the RTN fallback's input)."""

    names: list[str]
    weights: list[torch.Tensor]


def _result(split: _Split, scheme, codes_t, loss, scales, zeros, perm, dead) -> list[QuantizedTensor]:
    if perm is not None:
        unperm = torch.empty_like(codes_t)
        unperm[perm] = codes_t
        codes_t = unperm
    out = []
    r0 = 0
    for name, weight in zip(split.names, split.weights):
        r1 = r0 + weight.shape[0]  # as_rows keeps the first dimension
        out.append(QuantizedTensor(
            name=name,
            shape=tuple(weight.shape),
            scheme=scheme,
            codes=codes_t[:, r0:r1].t().contiguous().cpu(),
            scales=scales[r0:r1].contiguous().cpu(),
            zero_points=zeros[r0:r1].contiguous().cpu() if zeros is not None else None,
            info={"method": "gptq", "act_order": scheme.act_order, "dead_columns": int(dead.sum()),
                  "loss": float(loss[r0:r1].sum())},
        ))
        r0 = r1
    return out


def _gptq_low_rank(split: _Split, orig: torch.Tensor, x: torch.Tensor, scheme: QuantScheme) -> list[QuantizedTensor]:
    """Act-order GPTQ with H = x^T x / t (t tokens, fewer than the n columns) never formed.

    The dampened H is diagonal plus rank t: ``_low_rank_factor`` gives its reversed Cholesky
    factor R (H = R R^T) as dense diagonal blocks and, off them, R[j, k] = z_j . g_k with
    z_j = x[:, j] / sqrt(t). The column loop's feedback into column k from all earlier blocks,
    sum_j d_j R[j, k] / R[k, k], is then S g_k / R[k, k] with S = sum_j d_j z_j^T (rows x t),
    kept up to date once per block: rank-t work instead of the dense (n x n) updates. What is
    computed is the dense path's algorithm (``_column_loop`` in its static-groups form); only
    the float roundings differ."""
    rows, cols = orig.shape
    t = x.shape[0]
    if not _all_finite(x):
        return _fallback(split, scheme, (x.nan_to_num() ** 2).mean(0), "hessian has non-finite entries")
    h_diag = (x * x).sum(0) / t
    dead = h_diag == 0
    g_size = scheme.effective_group or cols
    group_view(orig, g_size)  # validates divisibility with a clear message
    bits, sym = scheme.bits, scheme.symmetric
    scales, zeros = _group_scales(orig, g_size, bits, sym, static=True)
    perm = torch.argsort(torch.where(dead, 1.0, h_diag), descending=True, stable=True)
    # the dense path's diagonal: dead columns 1 (their z_j are 0), then the dampening
    damp = scheme.dampening * torch.where(dead, 1.0, h_diag).mean()
    extra = (dead.to(torch.float32) + damp)[perm]
    # (n, t): z_j as rows in processing order, so that a block of them is one contiguous slice
    z = _transposed(x, perm).mul_(1.0 / math.sqrt(t))
    block = scheme.block_size
    fac = _low_rank_factor(z, extra, block)
    if isinstance(fac, int):
        return _fallback(split, scheme, h_diag, f"hessian not positive definite (cholesky failed at column {fac + 1}) after dampening {scheme.dampening}")
    r_blocks, gt = fac
    loss_scale = torch.cat([r.diagonal() for r in r_blocks])
    src = _transposed(orig, perm)  # (cols, rows), processing order: a block is a contiguous slice
    s_acc = torch.zeros(t, rows, dtype=torch.float32, device=orig.device)  # S^T

    def prepare(i1: int, i2: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = r_blocks[i1 // block]
        rd = r.diagonal()
        w1 = torch.addmm(src[i1:i2], gt[i1:i2] / rd.unsqueeze(1), s_acc)
        return w1, r / rd, src[i1:i2]

    def finish(i1: int, i2: int, d1: torch.Tensor) -> None:
        if i2 < cols:
            s_acc.addmm_(z[i1:i2].t(), d1)

    codes_t, loss = _column_loop(prepare, finish, None, orig, loss_scale, scales, zeros, perm, g_size, bits, block)
    return _result(split, scheme, codes_t, loss, scales, zeros, perm, dead)


def _low_rank_factor(z: torch.Tensor, extra: torch.Tensor, block: int):
    """R upper with Z Z^T + diag(extra) = R R^T (Z = ``z``, n x t, the z_j as rows), in block
    form: the dense diagonal blocks R[B, B] (one per ``block`` columns) and G^T (n x t, the g_k as
    rows) with R[j, k] = z_j . g_k for j in an earlier block than k. Or, where the matrix is not
    positive definite, the (0-based) column whose block failed.

    Blocks are eliminated from the last (R is H's factor in reversed column order). With the
    columns after block B eliminated, the remaining matrix is diag(extra) + Z Phi Z^T (Phi: t x t,
    the identity at first); its block A = Z_B Phi Z_B^T + diag(extra_B) = R[B, B] R[B, B]^T, the
    earlier rows R[E, B] = Z_E Phi Z_B^T R[B, B]^-T = Z_E G_B, and eliminating B leaves
    Phi - G_B G_B^T (the Schur complement, which stays diagonal plus rank t: block Cholesky
    with the trailing matrix never formed). Work: 2 t^2 n multiply-adds (Phi Z_B^T and the
    update), against n^3 / 3 for a dense Cholesky (E4B's down_proj at 2048 tokens: 137 G against
    1466 G); on the CPU 1.5 t^2 n, since BLAS updates only Phi's lower triangle (``syrk``) and
    reads only it (``symm``), which torch cannot say (``_low_rank_factor_blas``)."""
    if z.device.type == "cpu" and z.dtype in (torch.float32, torch.float64):
        return _low_rank_factor_blas(z, extra, block)
    return _low_rank_factor_torch(z, extra, block)


def _low_rank_factor_torch(z: torch.Tensor, extra: torch.Tensor, block: int):
    """``_low_rank_factor`` in torch's operations (any device; Phi kept whole)."""
    n, t = z.shape
    phi = torch.eye(t, dtype=z.dtype, device=z.device)
    gt = torch.empty(n, t, dtype=z.dtype, device=z.device)
    starts = list(range(0, n, block))
    r_blocks: list[torch.Tensor] = [None] * len(starts)  # type: ignore[list-item]
    for bi in range(len(starts) - 1, -1, -1):
        i1 = starts[bi]
        i2 = min(i1 + block, n)
        zb = z[i1:i2]  # (b, t)
        p = phi @ zb.t()  # (t, b)
        a = zb @ p
        a = (a + a.t()).mul_(0.5)  # symmetric to the last bit (LAPACK reads one triangle)
        a.diagonal().add_(extra[i1:i2])
        r, info = reverse_cholesky(a.contiguous())
        if info != 0:
            return i1 + info - 1
        gb = torch.linalg.solve_triangular(r.t(), p, upper=False, left=False)  # gb R^T = p
        phi.addmm_(gb, gb.t(), alpha=-1.0)
        gt[i1:i2] = gb.t()
        r_blocks[bi] = r.contiguous()
    return r_blocks, gt


def _low_rank_factor_blas(z: torch.Tensor, extra: torch.Tensor, block: int):
    """``_low_rank_factor`` on the CPU in BLAS/LAPACK calls (scipy's), on Phi's lower triangle.

    A row-major (b, t) slice of ``z`` is Z_B^T in column-major order and a (b, t) slice of G^T
    is G_B, so no block is copied. E4B's down_proj at 2048 tokens (t x t x 128 per call, an
    AVX2 CPU, 2 threads, 2026-12-03): Phi Z_B^T 9.5 ms by ``symm`` (torch's full GEMM 8.8), the
    update 4.3 ms by ``syrk`` (torch's full GEMM 9.0); the factor 2.1 s instead of torch's
    2.4-2.6 s on the old (t, n) layout. Not bit-identical to torch's: another BLAS's roundings."""
    from scipy.linalg import blas, lapack

    n, t = z.shape
    zn = z.detach().contiguous().numpy()
    ex = extra.detach().cpu().numpy()
    symm, syrk, gemm, trsm = blas.get_blas_funcs(("symm", "syrk", "gemm", "trsm"), (zn,))
    (potrf,) = lapack.get_lapack_funcs(("potrf",), (zn,))
    phi = np.asfortranarray(np.eye(t, dtype=zn.dtype))  # only its lower triangle is kept current
    gt = np.empty((n, t), dtype=zn.dtype)
    starts = list(range(0, n, block))
    r_blocks: list[torch.Tensor] = [None] * len(starts)  # type: ignore[list-item]
    for bi in range(len(starts) - 1, -1, -1):
        i1 = starts[bi]
        i2 = min(i1 + block, n)
        zb = zn[i1:i2].T  # (t, b) column-major: no copy
        p = symm(1.0, phi, zb, side=0, lower=1)  # Phi Z_B^T, (t, b)
        a = gemm(1.0, zb, p, trans_a=1)
        a = (a + a.T) * 0.5  # symmetric to the last bit (LAPACK reads one triangle)
        a[np.diag_indices_from(a)] += ex[i1:i2]
        # reversed Cholesky: J A J = M M^T with M lower, R = J M J (see reverse_cholesky)
        m, info = potrf(np.asfortranarray(a[::-1, ::-1]), lower=1, clean=1, overwrite_a=1)
        if info != 0:
            return i1 + (i2 - i1 - int(info) + 1) - 1
        r = np.asfortranarray(m[::-1, ::-1])
        gb = trsm(1.0, r, p, side=1, lower=0, trans_a=1, overwrite_b=1)  # gb R^T = p
        phi = syrk(-1.0, gb, beta=1.0, c=phi, trans=0, lower=1, overwrite_c=1)
        gt[i1:i2] = gb.T
        r_blocks[bi] = torch.from_numpy(np.ascontiguousarray(r))
    return r_blocks, torch.from_numpy(gt)


def _fallback(split: _Split, scheme: QuantScheme, h_diag: torch.Tensor, why: str) -> list[QuantizedTensor]:
    """RTN instead, with the Hessian's diagonal (mean x^2) as importance where the scheme asks."""
    log.warning("%s: GPTQ falls back to RTN: %s", " + ".join(split.names), why)
    importance = None
    if scheme.importance:
        d = h_diag.to(torch.float32)
        if torch.isfinite(d).all() and (d >= 0).all():
            importance = d.cpu()
    out = []
    for name, weight in zip(split.names, split.weights):
        qt = quantize_rtn(name, weight.detach().cpu(), scheme, importance=importance)
        qt.info["fallback"] = f"rtn: {why}"
        out.append(qt)
    return out


def _column_loop(prepare, finish, w: torch.Tensor | None, orig: torch.Tensor, loss_scale: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor | None, perm: torch.Tensor | None, g_size: int,
                 bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's loop over the columns of the weights, in processing order, a block at a time.

    ``prepare(i1, i2)`` gives the block's updated weights w' (transposed: (i2 - i1, rows), with
    every earlier block's feedback), its factor block f[i1:i2, i1:i2] and the block's original
    weights (same layout; the updated ones for dynamic groups, whose differences are taken from
    them); ``finish(i1, i2, d)`` feeds the block's differences d (same layout) on to the later
    columns. The dense path keeps the updated weights transposed in ``w`` (cols, rows) and its
    blocks are views of it, updated in place (read here too: a dynamic group's scale reads
    columns past the block); the low-rank path (``_gptq_low_rank``, static groups only) passes
    ``w=None``.

    Each column k is quantized from the updated weights w'_k; the rounding difference d_k is fed
    on to the later columns through row k of ``f``: w'_l += f[k, l] d_k (l > k; within a block at
    once, beyond it lazily, one matmul per block, sec. 4.2 of the GPTQ paper). Two equivalent
    forms, chosen by ``perm`` (given: static groups):
    - textbook (dynamic groups): d_k = w'_k - q_k and f = -U / diag(U) by rows, with
      H^-1 = U^T U, U upper. Every intermediate state of the weights is the textbook's, so a
      group's scale, chosen from its columns when the first is reached, is the textbook's.
    - from the originals (static groups): d_k = w_k - q_k with w the ORIGINAL weights, and
      f = R / diag(R) by columns, H = R R^T, R = U^-1 upper. Writing GPTQ's errors
      e_j = (w'_j - q_j) / U_jj as E gives W - Q = E U, so E = (W - Q) R and
      w'_k = w_k + sum_{j<k} (w_j - q_j) R_jk / R_kk: the same w'_k when column k is reached
      ("GPTQ as Babai's nearest plane algorithm", Chen et al. 2025, arXiv 2507.18553), without
      H^-1's factor. Only the partial states before that differ, which static groups never read.
    ``orig``: the original weights in their own column order (``perm`` maps processing order to
    it). Returns the codes transposed, (cols, rows) in processing order, and the per-row loss
    e_k^2 / 2 = ((w'_k - q_k) * loss_scale_k)^2 / 2. Static ``scales`` / ``zeros`` are read,
    dynamic ones are filled in at each group start.

    Speed: each block is worked on transposed, so a column is a contiguous row and the
    per-column updates stream through memory; with static groups they reach only the column's
    sub-block (``SUB_BLOCK`` columns), and each finished sub-block feeds the rest of its block
    in one matrix product (a third level of the same lazy-update idea); a group's scale reads
    only its own ``g_size`` columns; a group's reciprocal scales are computed once, not per
    column. The column step is 6 tensor operations with symmetric codes, because on a GPU each
    is a kernel launch and the loop runs once per input column (28672 times per E4B layer): a
    block's codes, dequantized values and differences are written into block buffers and
    converted or squared once per block."""
    rows, cols = orig.shape
    sym = zeros is None
    lo_q, hi_q = symmetric_range(bits) if sym else (0, (1 << bits) - 1)
    codes_t = torch.empty(cols, rows, dtype=torch.int8 if sym else torch.uint8, device=orig.device)
    loss = torch.zeros(rows, dtype=torch.float64, device=orig.device)
    order = perm.tolist() if perm is not None else range(cols)

    def reciprocal(s: torch.Tensor) -> torch.Tensor:
        return torch.where(s == 0, torch.zeros_like(s), 1.0 / s)

    if perm is not None:  # static groups: every group's scale is known before the loop
        # (groups, rows), a group a contiguous row: ``.t().to(float32)`` alone keeps the transposed
        # strides, and reading a group's scales 64 floats apart cost 10x the column's arithmetic.
        # Kept as lists of row views (``unbind``): the loop runs once per input column, and
        # indexing a tensor from Python is a dispatched ``select`` (2-3 us each, 8 per column:
        # a fifth of a column step at E4B's 2048 rows); a list index is free.
        s_all = scales.t().to(torch.float32).contiguous()
        s_rows = s_all.unbind(0)
        inv_rows = reciprocal(s_all).unbind(0)
        z_rows = None if sym else zeros.t().to(torch.float32).contiguous().unbind(0)
    groups = [o // g_size for o in order]
    s = inv = zf = None
    # Static groups need w'_k only when column k is reached, so within a block the feedback goes
    # a sub-block at a time: rank-1 updates inside a sub-block, one product beyond it (a quarter
    # of the memory-bound rank-1 work at 32 of 128; the same sums in another order). Dynamic
    # groups read later columns at each group start and keep the textbook's every update.
    sub = SUB_BLOCK if perm is not None else block
    q_buf = torch.empty(min(block, cols), rows, dtype=torch.float32, device=orig.device)
    dq_buf = torch.empty_like(q_buf)
    d_buf = torch.empty_like(q_buf)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        n = i2 - i1
        w1, f1, src1 = prepare(i1, i2)  # (n, rows): updated and original weights
        q1, dq1, d1 = q_buf[:n], dq_buf[:n], d_buf[:n]
        # the block's rows as views, made once per block (see s_rows)
        w_r, src_r, f_r = w1.unbind(0), src1.unbind(0), f1.unbind(0)
        q_r, dq_r, d_r = q1.unbind(0), dq1.unbind(0), d1.unbind(0)
        for i in range(n):
            j = i1 + i
            g = groups[j]
            if perm is not None:
                s, inv, zf = s_rows[g], inv_rows[g], None if sym else z_rows[g]
            elif j % g_size == 0:
                # Dynamic group scale from the freshest weights: the block is a view of w, so the
                # group's columns are rows j.. of w whether or not it runs past the block.
                cur = w[j:j + g_size].t()
                sg, zg = int_scales(cur.unsqueeze(1), bits, sym)
                scales[:, g] = sg[:, 0]
                s = sg[:, 0].to(torch.float32)
                inv = reciprocal(s)
                if not sym:
                    zeros[:, g] = zg[:, 0]
                    zf = zg[:, 0].to(torch.float32)
            q, dq, d = q_r[i], dq_r[i], d_r[i]
            # q = round(w' / s) clamped, as round(w' * inv): in place in the block's buffer
            torch.mul(w_r[i], inv, out=q)
            if sym:
                torch.mul(q.round_().clamp_(lo_q, hi_q), s, out=dq)
            else:
                torch.mul(q.add_(zf).round_().clamp_(lo_q, hi_q) - zf, s, out=dq)
            torch.sub(src_r[i], dq, out=d)
            end = min((i // sub + 1) * sub, n)  # the end of column i's sub-block
            if i + 1 < end:
                w1[i + 1:end].addr_(f_r[i][i + 1:end], d)
            elif end < n:  # the sub-block's feedback to the rest of the block, as one product
                w1[end:].addmm_(f1[end - sub:end, end:].t(), d1[end - sub:end])
        codes_t[i1:i2] = q1.to(codes_t.dtype)
        # a block's sum in float32 (128 terms per row), the running total in float64
        loss += ((w1 - dq1) * loss_scale[i1:i2].unsqueeze(1)).square_().sum(0).double() / 2
        finish(i1, i2, d1)
    return codes_t, loss
