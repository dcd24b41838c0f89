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
- a Hessian that is not positive definite after dampening (or not finite) falls back to RTN
  for this tensor; ``info["fallback"]`` records why.
"""
from __future__ import annotations

import logging

import torch

from quantize.errors import QuantizeError
from quantize.methods.rtn import as_rows, group_view, int_scales, quantize_rtn, symmetric_range
from quantize.qtensor import QuantizedTensor
from quantize.schemes import QuantScheme

log = logging.getLogger(__name__)


class HessianShapeError(QuantizeError):
    """The Hessian given for a tensor does not match its input width."""


def inverse_cholesky_upper(h: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The upper Cholesky factor U of H^-1 (H^-1 = U^T U) that GPTQ's column loop reads, and
    0 or, where H is not positive definite, the column (1-based) where its Cholesky failed. ``h`` (symmetric) is consumed:
    on the CPU its memory becomes U's.

    The reference implementation takes three n^3-order steps: L = chol(H), H^-1 from L
    (``cholesky_inverse``: a triangular inverse and a product), then chol(H^-1). With J the
    reversal permutation and J H J = M M^T (M lower), H^-1 = J M^-T M^-1 J = U^T U with
    U = J M^-1 J upper triangular: one Cholesky and one triangular inverse, n^3/3 flops each,
    half the work (E4B's 16384-wide down_proj spent 78 of its 90 CPU seconds in the three
    steps; these two take 28) with the same accuracy against float64 (0.8x-1.3x the reference's
    error, measured on trained layers' Hessians). On the CPU both run in
    LAPACK in place (``spotrf``, ``strtri``), so no n x n matrix besides ``h`` is allocated
    (1 GiB each for that down_proj); elsewhere torch's Cholesky and a triangular solve."""
    n = h.shape[0]
    if h.device.type == "cpu" and h.dtype == torch.float32 and h.is_contiguous():
        from scipy.linalg import lapack

        _reverse_both_axes_(h)
        a = h.numpy().T  # Fortran order over h's memory: J H J again, by symmetry
        c, info = lapack.spotrf(a, lower=1, overwrite_a=1, clean=1)
        if info != 0:
            return h, n - int(info) + 1  # the column in H's own order
        c, info = lapack.strtri(c, lower=1, overwrite_c=1)
        if info != 0:
            return h, -1  # not reached: a successful Cholesky has a non-zero diagonal
        minv = torch.from_numpy(c)  # M^-1, column-major: h's memory when LAPACK worked in place
        _reverse_both_axes_(minv)
        return minv, 0
    m, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info) != 0:
        return m, n - int(info) + 1
    eye = torch.eye(n, dtype=m.dtype, device=m.device)
    minv = torch.linalg.solve_triangular(m, eye, upper=False)
    del m, eye
    return minv.flip(0, 1), 0


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
    """``torch.isfinite(t).all()`` a block of rows at a time: on a whole float matrix it makes a
    full-size float temporary (|t|) besides the bool one, +1.75 GiB on E4B's down_proj Hessian."""
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


def gptq_quantize(name: str, weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme,
                  consume: bool = False) -> QuantizedTensor:
    """``consume``: the caller never reads ``hessian`` again (the last linear of a stage), so GPTQ
    works in its memory (permuted in place for act-order, then factored in place): no n x n copy.
    Measured at E4B's down_proj with act-order, 1.00 GiB beyond the inputs instead of 1.44
    (bench/results/gptq_speed.md; not the whole 1 GiB the copy takes, and the rest of the
    difference was not profiled). Codes are the same either way."""
    if scheme.type not in ("int4", "int8"):
        raise QuantizeError(f"{name}: GPTQ quantizes int4/int8 only, not {scheme.type!r}")
    w = as_rows(weight).clone()
    rows, cols = w.shape
    if tuple(hessian.shape) != (cols, cols):
        raise HessianShapeError(f"{name}: Hessian shape {tuple(hessian.shape)} does not match {cols} input columns")
    # Unless consumed, the caller's Hessian is only read (q/k/v and gate/up share one): GPTQ works
    # on one copy of it, permuted or not, so two n x n matrices are alive here, not three.
    h_in = hessian.detach().to(device=w.device, dtype=torch.float32)
    if not _all_finite(h_in):
        return _fallback(name, weight, scheme, torch.diagonal(h_in), "hessian has non-finite entries")

    diag = torch.diagonal(h_in).clone()
    h_diag = diag.clone()  # the fallback's importance: the Hessian itself may be overwritten below
    in_place = consume or h_in.data_ptr() != hessian.data_ptr()  # consumed, or already a private copy
    dead = diag == 0
    diag[dead] = 1.0
    g_size = scheme.effective_group or cols
    group_view(w, g_size)  # validates divisibility with a clear message
    bits, sym = scheme.bits, scheme.symmetric

    perm = None
    scales = torch.zeros(rows, cols // g_size, dtype=torch.float16, device=w.device)
    zeros = None if sym else torch.zeros(rows, cols // g_size, dtype=torch.uint8, device=w.device)
    if scheme.act_order:
        # Static groups: scales from the original order, before any error feedback.
        s0, z0 = int_scales(group_view(w, g_size), bits, sym)
        scales.copy_(s0)
        if zeros is not None:
            zeros.copy_(z0)
        perm = torch.argsort(diag, descending=True, stable=True)
    h = h_in if in_place else h_in.clone()
    del h_in
    if perm is not None:
        w = w[:, perm]
        _permute_symmetric_(h, perm)
        diag = diag[perm]
    h.diagonal().copy_(diag)  # dead columns: H[j, j] = 1
    del diag

    damp = scheme.dampening * torch.diagonal(h).mean()
    h.diagonal().add_(damp)
    hinv, info = inverse_cholesky_upper(h)
    del h
    if info != 0:
        return _fallback(name, weight, scheme, h_diag, f"hessian not positive definite (cholesky failed at column {info}) after dampening {scheme.dampening}")
    if not _all_finite(hinv):
        return _fallback(name, weight, scheme, h_diag, "inverse hessian not positive definite")

    codes_t, loss = _quantize_columns(w, hinv, scales, zeros, perm, g_size, bits, block=scheme.block_size)
    del hinv
    if perm is not None:
        unperm = torch.empty_like(codes_t)
        unperm[perm] = codes_t
        codes_t = unperm
    codes = codes_t.t().contiguous().cpu()
    return QuantizedTensor(
        name=name,
        shape=tuple(weight.shape),
        scheme=scheme,
        codes=codes,
        scales=scales.cpu(),
        zero_points=zeros.cpu() if zeros is not None else None,
        info={"method": "gptq", "act_order": scheme.act_order, "dead_columns": int(dead.sum()), "loss": float(loss.sum())},
    )


def _fallback(name: str, weight: torch.Tensor, scheme: QuantScheme, h_diag: torch.Tensor, why: str) -> QuantizedTensor:
    """RTN instead, with the Hessian's diagonal (mean x^2) as importance where the scheme asks."""
    log.warning("%s: GPTQ falls back to RTN: %s", name, why)
    importance = None
    if scheme.importance:
        d = h_diag.to(torch.float32)
        if torch.isfinite(d).all() and (d >= 0).all():
            importance = d.cpu()
    qt = quantize_rtn(name, weight.detach().cpu(), scheme, importance=importance)
    qt.info["fallback"] = f"rtn: {why}"
    return qt


def _quantize_columns(w: torch.Tensor, hinv: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      perm: torch.Tensor | None, g_size: int, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's loop over the columns of ``w`` (already in processing order; updated in place).

    Returns the codes transposed, (cols, rows) in processing order, and the per-row loss. Static
    ``scales`` / ``zeros`` (act-order) are read, dynamic ones are filled in at each group start.

    Speed without changing a bit: each block is worked on as a transposed copy, so a column is a
    contiguous row and the per-column updates stream through memory; a group's scale reads only
    its own ``g_size`` columns; a group's reciprocal scales are computed once, not per column.
    The column step is as few tensor operations as the textbook arithmetic allows (9 with
    symmetric codes, where the textbook step takes 15), because on a GPU each is a kernel
    launch and the loop runs once per input column (28672 times per E4B layer): a block's codes
    and errors are written into block buffers, converted and squared once per block. Every code
    and update still goes through the same float operations in the same order as in the
    textbook loop, and the lazy update after a block is the same matmul on the same operands.
    Only the float64 loss is summed in another order (a block's columns first): it may differ in
    the last bits."""
    rows, cols = w.shape
    sym = zeros is None
    lo_q, hi_q = symmetric_range(bits) if sym else (0, (1 << bits) - 1)
    codes_t = torch.empty(cols, rows, dtype=torch.int8 if sym else torch.uint8, device=w.device)
    loss = torch.zeros(rows, dtype=torch.float64, device=w.device)
    order = perm.tolist() if perm is not None else range(cols)

    def reciprocal(s: torch.Tensor) -> torch.Tensor:
        return torch.where(s == 0, torch.zeros_like(s), 1.0 / s)

    if perm is not None:  # static groups: every group's scale is known before the loop
        s_all = scales.t().to(torch.float32)  # (groups, rows): a group is a contiguous row
        inv_all = reciprocal(s_all)
        z_all = None if sym else zeros.t().to(torch.float32)
    s = inv = zf = None
    q_buf = torch.empty(min(block, cols), rows, dtype=torch.float32, device=w.device)
    err_buf = torch.empty_like(q_buf)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        n = i2 - i1
        w1 = w[:, i1:i2].t().contiguous()  # (n, rows)
        q1, err1 = q_buf[:n], err_buf[:n]
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(n):
            j = i1 + i
            g = order[j] // g_size
            if perm is not None:
                s, inv, zf = s_all[g], inv_all[g], None if sym else z_all[g]
            elif j % g_size == 0:
                # Dynamic group scale from the freshest weights: in-block columns are updated in
                # w1, the rest of the group (if it runs past the block) still lives in w.
                rest = g_size - (n - i)
                cur = w1[i:i + g_size].t() if rest <= 0 else torch.cat([w1[i:].t(), w[:, i2:i2 + rest]], dim=1)
                sg, zg = int_scales(cur.unsqueeze(1), bits, sym)
                scales[:, g] = sg[:, 0]
                s = sg[:, 0].to(torch.float32)
                inv = reciprocal(s)
                if not sym:
                    zeros[:, g] = zg[:, 0]
                    zf = zg[:, 0].to(torch.float32)
            col, q, err = w1[i], q1[i], err1[i]
            # q = round(col / s) clamped, as round(col * inv): in place in the block's buffer
            torch.mul(col, inv, out=q)
            if sym:
                dq = q.round_().clamp_(lo_q, hi_q) * s
            else:
                dq = (q.add_(zf).round_().clamp_(lo_q, hi_q) - zf) * s
            torch.div(col - dq, hinv1[i, i], out=err)
            w1[i + 1:] -= hinv1[i, i + 1:].unsqueeze(1) * err.unsqueeze(0)
        codes_t[i1:i2] = q1.to(codes_t.dtype)
        loss += (err1.double() ** 2).sum(0) / 2
        w[:, i2:] -= err1.t().contiguous() @ hinv[i1:i2, i2:]
    return codes_t, loss
