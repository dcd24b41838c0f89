"""fp8 (e4m3) KV-cache scales: one k scale and one v scale per cache.

In Gemma 3n a KV-sharing group (a producer layer and the layers that reuse its cache) has a
single cache, so it gets one k and one v scale, shared by producer and consumers. The scale is
``amax / 448`` over what the cache holds: the producer's keys after ``k_norm`` and RoPE and its
values after ``v_norm``, over all calibration tokens (the quantized producer's, since that is
what inference caches).
"""
from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0


class KVRange:
    """Running absolute maxima of the keys and values one cache holds."""

    def __init__(self) -> None:
        self.k_amax = 0.0
        self.v_amax = 0.0
        self.tokens = 0

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys / values: (batch, kv_heads, tokens, head_dim), as Gemma 3n caches them."""
        self.k_amax = max(self.k_amax, float(keys.detach().abs().amax()))
        self.v_amax = max(self.v_amax, float(values.detach().abs().amax()))
        self.tokens += keys.shape[0] * keys.shape[2]

    def scales(self) -> tuple[float, float]:
        return kv_fp8_scales(self.k_amax, self.v_amax)


def kv_fp8_scales(k_amax: float, v_amax: float) -> tuple[float, float]:
    """(k_scale, v_scale) so that ``x / scale`` fits e4m3; a zero range gets scale 1."""
    k = k_amax / FP8_E4M3_MAX if k_amax > 0 else 1.0
    v = v_amax / FP8_E4M3_MAX if v_amax > 0 else 1.0
    return k, v
