"""Our ``QuantizedTensor`` in compressed-tensors' on-disk layout, and the ``quantization_config``.

The codes are written as they are (no re-quantization): the packing is compressed-tensors' own
``pack_to_int32`` and the config is built from its ``QuantizationArgs`` / ``QuantizationScheme``
/ ``QuantizationConfig`` classes, so the format is the package's, not a copy of it.

compressed-tensors' integer convention is signed for both symmetric and asymmetric schemes:
codes and zero points live in [-2^(b-1), 2^(b-1)-1] and ``W = (q - z) * s``. Our asymmetric codes
and zero points are unsigned ([0, 2^b-1]); shifting both by 2^(b-1) leaves ``q - z`` unchanged.
``pack_to_int32`` then adds the same offset back when it packs, so the bits on disk are our
unsigned codes.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from quantize.errors import ExportError
from quantize.formats.safetensors.layout import TensorLayout
from quantize.qtensor import QuantizedTensor
from quantize.schemes import QuantScheme

PACKED_FORMAT = "pack-quantized"
NAIVE_FORMAT = "naive-quantized"
FP8_FORMAT = "float-quantized"


def quantization_args(scheme: QuantScheme):
    """compressed-tensors ``QuantizationArgs`` for one of our schemes (weights only)."""
    from compressed_tensors.quantization import QuantizationArgs

    kw = {
        "num_bits": scheme.bits,
        "type": "float" if scheme.type == "fp8" else "int",
        "symmetric": scheme.symmetric,
        "strategy": scheme.strategy,
        "dynamic": False,
    }
    if scheme.strategy == "group":
        kw["group_size"] = scheme.group_size
    if scheme.method == "gptq" and scheme.act_order:
        # Our GPTQ undoes the column permutation before it hands codes over (no g_idx is
        # written), which compressed-tensors calls "weight" act-order: static groups.
        kw["actorder"] = "weight"
    return QuantizationArgs(**kw)


def _signed(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned asymmetric codes / zero points in compressed-tensors' signed range."""
    return (t.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def compressed_tensors_of(qt: QuantizedTensor, module: str, packed: bool = True) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one quantized Linear/Embedding weight:
    ``pack-quantized`` (``packed``) or ``naive-quantized`` (one int8 per code) for int schemes."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    s = qt.scheme
    if s.type == "fp8":
        scale = qt.scales.to(torch.float32)
        if s.strategy == "tensor":
            scale = scale.reshape(1)
        return {f"{module}.weight": qt.codes.contiguous(), f"{module}.weight_scale": scale.contiguous()}
    bits = s.bits
    codes = qt.codes if s.symmetric else _signed(qt.codes, bits)
    if not packed:
        out = {f"{module}.weight": codes.contiguous(), f"{module}.weight_scale": qt.scales.to(torch.float16).contiguous()}
        if not s.symmetric:
            out[f"{module}.weight_zero_point"] = _signed(qt.zero_points, bits).contiguous()
        return out
    out = {
        f"{module}.weight_packed": pack_to_int32(codes, bits),
        f"{module}.weight_scale": qt.scales.to(torch.float16).contiguous(),
        f"{module}.weight_shape": torch.tensor([qt.rows, qt.cols], dtype=torch.int64),
    }
    if not s.symmetric:
        out[f"{module}.weight_zero_point"] = pack_to_int32(_signed(qt.zero_points, bits), bits, packed_dim=0)
    return out


_FORMATS = {"packed": PACKED_FORMAT, "naive": NAIVE_FORMAT, "fp8": FP8_FORMAT}


def _compact_targets(modules: list[str]) -> list[str]:
    """Module names as few anchored regexes: names that differ only in their layer number share
    one target whose layer alternatives are listed (exactly the modules given, nothing more)."""
    by_shape: dict[tuple[str, str], list[int]] = defaultdict(list)
    singles: list[str] = []
    for m in modules:
        hit = re.search(r"\.layers\.(\d+)\.", m)
        if hit is None:
            singles.append(m)
            continue
        by_shape[(m[: hit.start()], m[hit.end():])].append(int(hit.group(1)))
    targets = []
    for (head, tail), layers in sorted(by_shape.items()):
        alt = "|".join(str(i) for i in sorted(set(layers)))
        targets.append(f"re:^{re.escape(head)}\\.layers\\.({alt})\\.{re.escape(tail)}$")
    return targets + sorted(singles)


def kv_cache_args():
    """The fp8 KV-cache scheme llm-compressor writes and vLLM reads: static e4m3, one scale per
    tensor (our scales are per cache: see ``quantize.kv_cache``)."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor", dynamic=False)


def kv_cache_tensors(layer_scales: dict[int, tuple[float, float]]) -> dict[str, torch.Tensor]:
    """Every layer's ``k_scale`` / ``v_scale`` on its attention module, shape (1,) as
    compressed-tensors initializes them for the ``tensor`` strategy; fp32 keeps ``amax / 448``
    as measured (loaders cast to the module's dtype)."""
    from quantize.kv_cache import kv_scale_names

    out = {}
    for layer, (k, v) in sorted(layer_scales.items()):
        k_name, v_name = kv_scale_names(layer)
        out[k_name] = torch.tensor([k], dtype=torch.float32)
        out[v_name] = torch.tensor([v], dtype=torch.float32)
    return out


def build_quantization_config(layouts: list[TensorLayout], tied_lm_head: bool, kv_cache: bool = False) -> dict:
    """``quantization_config`` for config.json: one config group per distinct scheme (its
    targets are exactly the modules written with it), and every weight-bearing module left
    unquantized in ``ignore`` (norms, kept towers, convolutions written dequantized, lm_head);
    with ``kv_cache``, the fp8 ``kv_cache_scheme``."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    groups: dict[tuple[str, str], list[TensorLayout]] = defaultdict(list)
    for lay in layouts:
        if lay.kind in _FORMATS:
            groups[(lay.entry.scheme.label(), _FORMATS[lay.kind])].append(lay)
    if not groups:
        raise ExportError(
            "compressed-tensors export: the plan quantizes no Linear or Embedding weight, so there is "
            "nothing to compress; keep the checkpoint as it is or give a tower a quantized scheme"
        )
    config_groups = {}
    formats = set()
    for i, ((label, fmt), lays) in enumerate(sorted(groups.items())):
        scheme = lays[0].entry.scheme
        formats.add(fmt)
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=_compact_targets([lay.module for lay in lays]),
            weights=quantization_args(scheme),
            format=fmt,
        )
    ignore = sorted({lay.module for lay in layouts if lay.kind in ("original", "dequantized")})
    if tied_lm_head:
        # The tied output projection shares embed_tokens' weight; it must stay dense or
        # transformers fails with "Linear has no attribute weight".
        ignore.append("lm_head")
    qc = QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
        kv_cache_scheme=kv_cache_args() if kv_cache else None,
    )
    from compressed_tensors.base import (
        COMPRESSION_VERSION_NAME,
        QUANTIZATION_METHOD,
        QUANTIZATION_METHOD_NAME,
        SPARSITY_CONFIG_NAME,
        TRANSFORM_CONFIG_NAME,
    )

    # Same keys, same order as ModelCompressor.update_config writes them.
    return {
        COMPRESSION_VERSION_NAME: compressed_tensors.__version__,
        QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
        SPARSITY_CONFIG_NAME: {},
        TRANSFORM_CONFIG_NAME: {},
        **qc.model_dump(exclude=["quant_method"]),
    }
