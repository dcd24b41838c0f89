"""fp8 (e4m3) KV-cache scales: one k scale and one v scale per cache.

In Gemma 3n a KV-sharing group (a producer layer and the layers that reuse its cache) has a
single cache, so it gets one k and one v scale, shared by producer and consumers. The scale is
``amax / 448`` over what the cache holds: the producer's keys after ``k_norm`` and RoPE and its
values after ``v_norm``, over all calibration tokens (the quantized producer's, since that is
what inference caches).

Where the scales go: the compressed-tensors safetensors artifact (``kv_cache_scheme`` in its
``quantization_config`` and a ``k_scale`` / ``v_scale`` tensor per attention module, the layout
llm-compressor writes and vLLM reads). Every layer gets its cache's scales: a KV consumer carries
its producer's, because a runtime that shares the cache (vLLM) dequantizes it with the reading
layer's own scales. Nothing else has a place for them: GGUF has no static KV-cache scales
(llama.cpp picks a cache type at load time and quantizes on the fly) and bitsandbytes folders
have no KV-cache scheme, so a recipe asking for them without a compressed-tensors export is
refused (``validate_kv_cache``): a key that writes nothing would be a silent no-op.
"""
from __future__ import annotations

import torch

from quantize.errors import RecipeError

FP8_E4M3_MAX = 448.0
GGUF_KV_NOTE = (
    "GGUF: kv_cache.fp8 scales are not in the GGUF: llama.cpp has no static KV-cache scales (the cache "
    "type is chosen at load time, e.g. --cache-type-k q8_0, and quantized on the fly); they are in the "
    "safetensors artifact's kv_cache_scheme and in this manifest's kv_cache_scales"
)


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


def kv_scale_names(layer: int) -> tuple[str, str]:
    """Checkpoint names of a decoder layer's cache scales, as compressed-tensors registers them
    on the attention module (``initialize_attn_qparams``: base names ``k`` / ``v``)."""
    attn = f"model.language_model.layers.{layer}.self_attn"
    return f"{attn}.k_scale", f"{attn}.v_scale"


def validate_kv_cache(recipe) -> None:
    """Refuse ``kv_cache.fp8`` when no artifact of the recipe can hold the scales (see the module doc)."""
    if not recipe.kv_cache.fp8:
        return
    st = recipe.exports.safetensors
    if st is not None and st.enabled and st.format == "compressed-tensors":
        return
    if st is not None and st.enabled:
        where = f"exports.safetensors.format {st.format} has no KV-cache scheme"
    else:
        where = "the recipe writes only GGUF, which has no static KV-cache scales"
    raise RecipeError(
        f"kv_cache.fp8: {where}, so the scales would be written nowhere; add "
        "exports.safetensors {format: compressed-tensors} or set kv_cache.fp8: false"
    )
