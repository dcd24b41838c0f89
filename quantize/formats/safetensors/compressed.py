"""compressed-tensors export: our codes and scales, streamed a tensor at a time into shards."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from quantize.errors import ExportError
from quantize.formats.safetensors.ct_format import (
    build_quantization_config,
    compressed_tensors_of,
    kv_cache_tensors,
)
from quantize.formats.safetensors.folder import (
    atomic_folder,
    copy_side_files,
    write_config,
)
from quantize.formats.safetensors.layout import (
    TensorLayout,
    has_tied_lm_head,
    plan_layouts,
)
from quantize.formats.safetensors.shards import ShardWriter
from quantize.qtensor import QuantizedTensor

log = logging.getLogger(__name__)

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
GIB = 1 << 30


def validate_compressed(plan) -> list[TensorLayout]:
    """Refuse, before anything is read or written, what the format cannot hold."""
    layouts = plan_layouts(plan)
    for lay in layouts:
        e = lay.entry
        if lay.kind in ("packed", "naive", "fp8") and e.scheme.strategy == "group":
            cols = e.shape[1]
            if cols % e.scheme.group_size:
                raise ExportError(
                    f"{e.name}: {cols} input columns do not split into groups of {e.scheme.group_size}; "
                    f"give it a group_size that divides {cols} or strategy 'channel'"
                )
        if lay.kind == "dequantized" and e.dtype not in TORCH_DTYPES:
            raise ExportError(f"{e.name}: cannot write a dequantized convolution in source dtype {e.dtype}")
    return layouts


def _quantized(source, lay: TensorLayout) -> QuantizedTensor:
    t = source.get(lay.entry.name)
    if not isinstance(t, QuantizedTensor):
        raise ExportError(f"{lay.entry.name}: the plan quantizes it ({lay.entry.scheme.label()}) but the source gave a plain tensor")
    if t.scheme != lay.entry.scheme:
        raise ExportError(f"{lay.entry.name}: source tensor has scheme {t.scheme.label()}, the plan says {lay.entry.scheme.label()}")
    return t


def tensors_for(source, lay: TensorLayout) -> dict[str, torch.Tensor]:
    """What one plan entry writes (nothing for a dead k/v)."""
    e = lay.entry
    if lay.kind == "dead":
        return {}
    if lay.kind == "original":
        t = source.get(e.name)
        if isinstance(t, QuantizedTensor):
            raise ExportError(f"{e.name}: the plan keeps it but the source gave a quantized tensor")
        return {e.name: t}
    qt = _quantized(source, lay)
    if lay.kind == "dequantized":
        return {e.name: qt.dequantize().to(TORCH_DTYPES[e.dtype])}
    return compressed_tensors_of(qt, lay.module, packed=lay.kind == "packed")


def _kv_scales(ctx) -> dict[int, tuple[float, float]]:
    """Every decoder layer's fp8 KV-cache scales when the recipe asks for them (else none)."""
    if not ctx.recipe.kv_cache.fp8:
        return {}
    n = int(ctx.source.config["text_config"]["num_hidden_layers"])
    scales = dict(ctx.source.kv_scales)
    missing = sorted(set(range(n)) - set(scales))
    if missing:
        raise ExportError(
            f"kv_cache.fp8: no KV-cache scales for decoder layers {missing} (calibration gave layers {sorted(scales)})"
        )
    return scales


def write_compressed(ctx, options, out: Path) -> list[Path]:
    plan = ctx.source.plan
    layouts = validate_compressed(plan)
    kv_scales = _kv_scales(ctx)
    qconfig = build_quantization_config(layouts, tied_lm_head=has_tied_lm_head(plan), kv_cache=bool(kv_scales))
    metadata = {k: str(v) for k, v in ctx.provenance.items()}
    with atomic_folder(out) as tmp:
        writer = ShardWriter(tmp, int(options.max_shard_gb * GIB), metadata)
        for lay in tqdm(layouts, desc="safetensors (compressed-tensors)", unit="tensor", disable=len(layouts) < 50):
            for name, t in tensors_for(ctx.source, lay).items():
                writer.add(name, t)
        for name, t in kv_cache_tensors(kv_scales).items():
            writer.add(name, t)
        files = writer.finish()
        files.append(write_config(ctx.source.config, tmp, qconfig))
        files += copy_side_files(ctx.source.checkpoint.folder, tmp)
        rel = [p.name for p in files]
    return [out / n for n in rel]
