"""Round-to-nearest quantization: int4 / int8 (symmetric or not, per channel or grouped) and fp8.

Pure tensor functions: weights (and optional per-column importance) in, ``QuantizedTensor`` out.
Symmetric int scales follow llama.cpp's Q4_0 / Q8_0 convention so that our codes are valid
blocks as they are: int4 uses ``d = m / -8`` where ``m`` is the signed value of largest
magnitude (codes reach both -8 and +7); int8 uses ``d = amax / 127``. Scales are rounded to fp16
*before* the codes are computed, so codes and fp16 scales are consistent.

With ``scheme.importance`` and a per-column importance vector (mean squared activation, like
llama.cpp's imatrix) the int scale of every group is searched over a small candidate set
(llama.cpp's ``make_qx_quants`` idea: several ``iscale`` trials, each followed by a weighted
least-squares refit of the scale), keeping whichever minimises the importance-weighted squared
error. The plain RTN choice is always one of the candidates, so the weighted error never gets
worse; codes stay in the same grid and scales stay fp16, so a Q4_0 / Q8_0 block stays valid.
"""
from __future__ import annotations

import math

import torch

from quantize.errors import QuantizeError
from quantize.qtensor import QuantizedTensor
from quantize.schemes import QuantScheme

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """Weights flattened to (rows, cols) fp32, the layout ``QuantizedTensor`` uses."""
    return weight.detach().reshape(weight.shape[0], -1).to(torch.float32)


def group_view(w2d: torch.Tensor, group: int | None) -> torch.Tensor:
    """(rows, cols) -> (rows, n_groups, group)."""
    rows, cols = w2d.shape
    g = cols if group is None else group
    if cols % g:
        raise ValueError(f"{cols} columns are not a multiple of group size {g}")
    return w2d.reshape(rows, cols // g, g)


def _signed_max(groups: torch.Tensor) -> torch.Tensor:
    """Each group's value of largest magnitude, sign kept; where both signs reach it (or the
    group is all zeros, signed or not), the first such value, as llama.cpp's
    ``quantize_row_q4_0_ref`` picks it (a strict ``<``). One ``aminmax`` pass, then
    ``abs().argmax()`` only for those groups: abs/argmax/gather over every group were three
    passes and a copy (E4B's gate_proj: 190 against 95 ms on a 2-core AVX2 CPU), and the
    tied groups are rare (0.7% of a bf16 checkpoint's groups of 32)."""
    mn, mx = groups.aminmax(dim=-1)
    out = torch.where(-mn > mx, mn, mx)
    tied = (-mn == mx).nonzero(as_tuple=True)
    if tied[0].numel():
        sub = groups[tied]
        out[tied] = sub.gather(-1, sub.abs().argmax(-1, keepdim=True)).squeeze(-1)
    return out


def int_scales(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp16 scales (rows, n_groups) and uint8 zero points (or None) for grouped fp32 weights."""
    if symmetric:
        if bits == 4:
            scale = _signed_max(groups) / -8.0
        else:
            scale = groups.abs().amax(dim=-1) / 127.0
        return scale.to(torch.float16), None
    qmax = (1 << bits) - 1
    lo = groups.amin(dim=-1).clamp(max=0.0)
    hi = groups.amax(dim=-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float32)
    zero = torch.round(-lo / safe).clamp(0, qmax).to(torch.uint8)
    return scale, zero


def symmetric_range(bits: int) -> tuple[int, int]:
    """Code range of symmetric int codes: [-8, 7] for int4 (Q4_0 stores q + 8 in a nibble and
    uses -8), [-127, 127] for int8. llama.cpp's Q8_0 never holds -128 (its quantizer rounds
    amax / d = 127), and its x86 kernels compute |x| with a sign trick that only holds there:
    codes from a tighter scale (importance search, GPTQ) clip at -127 as they do at +127."""
    hi = (1 << (bits - 1)) - 1
    return (-hi if bits == 8 else -hi - 1), hi


def int_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes for grouped weights under given scales (and zero points)."""
    return float_codes(groups, scale, zero, bits).to(torch.int8 if zero is None else torch.uint8)


def float_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                out: torch.Tensor | None = None, centred: bool = False) -> torch.Tensor:
    """``int_codes`` as float32 values (what the search works on: no int round trip), written
    into ``out`` (of ``groups``' shape) when given; ``centred``: minus the zero points, the
    multiples of the scale that the dequantized values are."""
    s = scale.to(torch.float32).unsqueeze(-1)
    inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    q = torch.mul(groups, inv, out=out) if out is not None else groups * inv
    if zero is None:
        lo, hi = symmetric_range(bits)
        return q.round_().clamp_(lo, hi)
    zf = zero.to(torch.float32).unsqueeze(-1)
    q.add_(zf).round_().clamp_(0, (1 << bits) - 1)
    return q.sub_(zf) if centred else q


def quantize_int(name: str, weight: torch.Tensor, scheme: QuantScheme) -> QuantizedTensor:
    """Plain RTN for int4 / int8."""
    bits = scheme.bits
    groups = group_view(as_rows(weight), scheme.effective_group)
    scale, zero = int_scales(groups, bits, scheme.symmetric)
    codes = int_codes(groups, scale, zero, bits)
    return QuantizedTensor(
        name=name,
        shape=tuple(weight.shape),
        scheme=scheme,
        codes=codes.reshape(weight.shape[0], -1),
        scales=scale,
        zero_points=zero,
    )


def quantize_fp8(name: str, weight: torch.Tensor, scheme: QuantScheme) -> QuantizedTensor:
    """fp8 e4m3 with a per-tensor or per-output-channel fp32 scale (amax / 448)."""
    w = as_rows(weight)
    if scheme.strategy == "tensor":
        amax = w.abs().amax().reshape(1, 1)
    else:
        amax = w.abs().amax(dim=1, keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedTensor(name=name, shape=tuple(weight.shape), scheme=scheme, codes=codes, scales=scale)


# Candidate scale multipliers tried per group by the importance search, relative to the plain
# RTN scale. Mirrors make_qx_quants' ``iscale = -(nmax + 0.1 * is) / max`` for is in [-9, 9]
# (for int4, nmax = 8: multipliers 8 / (8 + 0.1 is) in [0.90, 1.13]); a few tighter clips are
# added because weighted error often prefers clipping outliers of unimportant columns.
IMPORTANCE_STEPS = tuple(range(-9, 10))
EXTRA_CLIPS = (0.6, 0.7, 0.8, 0.85)
ROW_CHUNK = 256  # rows searched at once: a few (chunk, cols) temporaries, whatever the matrix size


class ImportanceError(QuantizeError):
    """An importance vector does not fit the tensor it should weight."""


def _importance_search(groups: torch.Tensor, wts: torch.Tensor, bits: int, symmetric: bool):
    """Best (scale, zero) per group under importance weights; plain RTN is candidate 0.

    Each candidate (scale, zero) is scored by sum w (x - s q)^2 per group, with q its centred
    float codes: the dequantized values as ``QuantizedTensor.dequantize`` computes them, so the
    comparison is with what the file holds. After each multiplier's candidate the scale is refit
    to its codes by weighted least squares (argmin_s sum w (x - s q)^2 = sum w x q / sum w q^2)
    and the codes re-rounded. Only the best scales (and zero points) are kept: the codes are a
    function of them (``int_codes``), computed once at the end.

    Speed: the codes, differences and products live in three buffers of the chunk's size,
    written in place (``out=``, ``float_codes`` included), instead of about 8 fresh tensors per
    candidate; the same float operations in the same order, so the same choices bit for bit (a
    16384 x 2048 int8 matrix on a 2-core AVX2 CPU: 4.9 -> 3.8 s)."""
    base_scale, base_zero = int_scales(groups, bits, symmetric)
    best_scale, best_zero = base_scale, base_zero
    best_err = torch.full(groups.shape[:-1], math.inf, dtype=torch.float32, device=groups.device)
    qmax = (1 << bits) - 1  # the largest unsigned code: asymmetric codes and zero points
    nmax = (8.0 if bits == 4 else 127.0) if symmetric else float(qmax)  # the plain scale's divisor (int_scales)
    mults = [nmax / (nmax + 0.1 * i) for i in IMPORTANCE_STEPS if i] + list(EXTRA_CLIPS)
    lo = groups.amin(dim=-1).clamp(max=0.0)
    wx = wts * groups
    qc, d, e = (torch.empty_like(groups) for _ in range(3))  # centred codes, x - s q, products

    def consider(scale, zero) -> None:
        """Codes of (scale, zero) into ``qc``, centred; keeps the candidate where it is better."""
        nonlocal best_scale, best_zero, best_err
        float_codes(groups, scale, zero, bits, out=qc, centred=True)
        torch.sub(groups, torch.mul(qc, scale.to(torch.float32).unsqueeze(-1), out=d), out=d)
        err = torch.mul(wts, d, out=e).mul_(d).sum(-1)
        better = err < best_err
        if better.any():
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            if zero is not None:
                best_zero = torch.where(better, zero, best_zero)

    def refit() -> torch.Tensor:
        """The weighted least-squares scale of the codes in ``qc``, as fp16."""
        num = torch.mul(wx, qc, out=e).sum(-1)
        den = torch.mul(wts, qc, out=e).mul_(qc).sum(-1)
        return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num)).to(torch.float16)

    consider(base_scale, base_zero)  # plain RTN first: every later candidate must beat it
    for m in mults:
        scale = (base_scale.to(torch.float32) * m).to(torch.float16)
        zero = None
        if not symmetric:
            safe = torch.where(scale == 0, torch.ones_like(scale), scale).to(torch.float32)
            zero = torch.round(-lo * m / safe).clamp(0, qmax).to(torch.uint8)
        consider(scale, zero)
        fit = refit()
        if symmetric:
            fit = torch.where(fit.to(torch.float32) * base_scale.to(torch.float32) > 0, fit, scale)
        else:
            fit = torch.where(fit > 0, fit, scale)
        consider(fit, zero)
    return int_codes(groups, best_scale, best_zero, bits), best_scale, best_zero


def quantize_int_importance(name: str, weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor) -> QuantizedTensor:
    """int4 / int8 RTN whose per-group scale minimises importance-weighted squared error."""
    w = as_rows(weight)
    rows, cols = w.shape
    imp = importance.detach().reshape(-1).to(torch.float32).to(w.device)
    if imp.numel() != cols:
        raise ImportanceError(f"{name}: importance has {imp.numel()} entries but the tensor has {cols} input columns")
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise ImportanceError(f"{name}: importance must be finite and non-negative")
    # Columns never seen active still deserve a little weight, so that their weights are not
    # thrown away entirely (llama.cpp adds sigma2 for the same reason).
    mean = imp.mean()
    imp = imp + (1e-3 * mean if mean > 0 else 1.0)
    g = scheme.effective_group or cols
    wts_all = imp.reshape(cols // g, g)
    codes_out, scales_out, zeros_out = [], [], []
    for r0 in range(0, rows, ROW_CHUNK):
        groups = group_view(w[r0:r0 + ROW_CHUNK], scheme.effective_group)
        c, s, z = _importance_search(groups, wts_all.unsqueeze(0), scheme.bits, scheme.symmetric)
        codes_out.append(c.reshape(groups.shape[0], -1))
        scales_out.append(s)
        if z is not None:
            zeros_out.append(z)
    return QuantizedTensor(
        name=name,
        shape=tuple(weight.shape),
        scheme=scheme,
        codes=torch.cat(codes_out),
        scales=torch.cat(scales_out),
        zero_points=torch.cat(zeros_out) if zeros_out else None,
        info={"importance": True},
    )


def quantize_rtn(name: str, weight: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None) -> QuantizedTensor:
    """RTN for any quantized scheme; importance-weighted scale search when the scheme asks for it
    and ``importance`` (mean squared activation per input column) is given. fp8 ignores it."""
    if scheme.type == "fp8":
        return quantize_fp8(name, weight, scheme)
    if scheme.type in ("int4", "int8"):
        if scheme.importance and importance is not None:
            return quantize_int_importance(name, weight, scheme, importance)
        return quantize_int(name, weight, scheme)
    raise ValueError(f"{name}: scheme {scheme.type!r} is not quantized")
