"""Round-to-nearest quantization: int4 / int8 (symmetric or not, per channel or grouped) and fp8.

Pure tensor functions: weights (and optional per-column importance) in, ``QuantizedTensor`` out.
Symmetric int scales follow llama.cpp's Q4_0 / Q8_0 convention so that our codes are valid
blocks as they are: int4 uses ``d = m / -8`` where ``m`` is the signed value of largest
magnitude (codes reach both -8 and +7); int8 uses ``d = amax / 127``. Scales are rounded to fp16
*before* the codes are computed, so codes and fp16 scales are consistent.
"""
from __future__ import annotations

import torch

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


def int_scales(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp16 scales (rows, n_groups) and uint8 zero points (or None) for grouped fp32 weights."""
    if symmetric:
        if bits == 4:
            idx = groups.abs().argmax(dim=-1, keepdim=True)
            signed_max = torch.gather(groups, -1, idx).squeeze(-1)
            scale = signed_max / -8.0
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


def int_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes for grouped weights under given scales (and zero points)."""
    s = scale.to(torch.float32).unsqueeze(-1)
    inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    if zero is None:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return torch.round(groups * inv).clamp(lo, hi).to(torch.int8)
    qmax = (1 << bits) - 1
    return torch.round(groups * inv + zero.to(torch.float32).unsqueeze(-1)).clamp(0, qmax).to(torch.uint8)


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


def quantize_rtn(name: str, weight: torch.Tensor, scheme: QuantScheme) -> QuantizedTensor:
    if scheme.type == "fp8":
        return quantize_fp8(name, weight, scheme)
    if scheme.type in ("int4", "int8"):
        return quantize_int(name, weight, scheme)
    raise ValueError(f"{name}: scheme {scheme.type!r} is not quantized")
