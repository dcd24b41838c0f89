"""bitsandbytes export: transformers loads the source with its bitsandbytes integration
(``BitsAndBytesConfig``), which quantizes Linear layers as they load, and ``save_pretrained``
writes the result. bitsandbytes has its own formats (NF4/FP4 blocks of 64 with fp32 absmax,
LLM.int8 rows with fp32 SCB), so this path re-quantizes from the source weights: our codes are
not used. Works on the CPU with bitsandbytes >= 0.45.

Which Linear layers bitsandbytes quantizes follows the plan: a Linear the plan keeps
(``keep`` schemes, ``ignore`` globs: AltUp, LAuReL, per-layer projections, the embedders by
default) goes into ``llm_int8_skip_modules``; every Linear the plan quantizes, whatever its
scheme, gets the one bitsandbytes type asked for. Embeddings and convolutions stay in the
source dtype (bitsandbytes quantizes Linear only), as does the tied lm_head.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from quantize.errors import ExportError
from quantize.formats.safetensors.folder import atomic_folder, copy_side_files
from quantize.formats.safetensors.layout import (
    DTYPE_BYTES,
    HEADER_BYTES_PER_TENSOR,
    has_tied_lm_head,
    is_compressible,
    is_embedding,
)

log = logging.getLogger(__name__)

BNB_BLOCK = 64  # bitsandbytes' 4-bit blocksize on CPU and GPU (transformers' default)
# Per 4-bit weight beyond codes and absmax: quant_map (16 fp32) and the JSON quant_state blob.
BNB4_EXTRA_BYTES = 64 + 160


def _bnb_linear(entry) -> bool:
    """Linear weights bitsandbytes converts: the plan quantizes them and they are not tables."""
    return entry.quantized and is_compressible(entry) and not is_embedding(entry)


def skip_modules(plan) -> list[str]:
    """Linear modules the plan keeps as they are (bitsandbytes must not touch them), and the
    tied lm_head: an explicit skip list replaces transformers' default one, which holds it."""
    kept = {
        e.name.rsplit(".", 1)[0]
        for e in plan.entries
        if is_compressible(e) and not is_embedding(e) and not e.quantized and not e.dead
    }
    if has_tied_lm_head(plan):
        kept.add("lm_head")
    return sorted(kept)


def validate_bnb(plan, options) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ExportError(f"exports.safetensors.format bitsandbytes needs the bitsandbytes package ({e})") from None
    if not any(_bnb_linear(e) for e in plan.entries):
        raise ExportError(
            "exports.safetensors: bitsandbytes quantizes Linear layers only and the plan quantizes none; "
            "give the text tower (or another Linear tower) a quantized scheme"
        )


def _source_dtype(config: dict):
    import torch

    name = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def bnb_config(plan, options, compute_dtype):
    from transformers import BitsAndBytesConfig

    skip = skip_modules(plan)
    if options.bnb == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.bnb,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=False,
        llm_int8_skip_modules=skip,
    )


def write_bnb(ctx, options, out: Path) -> list[Path]:
    import torch
    from transformers import Gemma3nForConditionalGeneration

    plan = ctx.source.plan
    validate_bnb(plan, options)
    src = ctx.source.checkpoint.folder
    dtype = _source_dtype(ctx.source.config)
    qconfig = bnb_config(plan, options, dtype)
    log.info("bitsandbytes %s: loading %s through transformers (re-quantizes from the source weights)", options.bnb, src)
    model = Gemma3nForConditionalGeneration.from_pretrained(str(src), quantization_config=qconfig, dtype=dtype, device_map="cpu",
                                                            use_kernels=False)
    try:
        with atomic_folder(out) as tmp:
            with torch.no_grad():
                model.save_pretrained(str(tmp), max_shard_size=f"{int(options.max_shard_gb * 1024)}MB")
            copy_side_files(src, tmp)
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    finally:
        del model
    return [out / n for n in names]


def predicted_bnb_bytes(plan, options) -> int:
    total = 0
    n_tensors = 0
    for e in plan.entries:
        if e.dead:
            continue
        n = math.prod(e.shape)
        if _bnb_linear(e):
            if options.bnb == "int8":
                total += n + e.shape[0] * 4 + 1  # int8 codes, fp32 SCB per row, weight_format byte
                n_tensors += 3
            else:
                total += n // 2 + math.ceil(n / BNB_BLOCK) * 4 + BNB4_EXTRA_BYTES
                n_tensors += 4
        else:
            total += n * DTYPE_BYTES.get(e.dtype, 4)
            n_tensors += 1
    header = n_tensors * (HEADER_BYTES_PER_TENSOR + 80)
    return total + header + 8192  # + config.json with the quantization_config


def bnb_notes(plan, options) -> list[str]:
    kept = [e for e in plan.entries if e.quantized and not _bnb_linear(e)]
    notes = [
        (
            f"safetensors-bnb-{options.bnb}: bitsandbytes re-quantized every Linear the plan quantizes to "
            f"{options.bnb} from the source weights (its own format; our codes and per-tower schemes are not used)"
        )
    ]
    if kept:
        towers = sorted({e.tower for e in kept})
        notes.append(
            f"safetensors-bnb-{options.bnb}: {len(kept)} tensors the plan quantizes are not Linear weights "
            f"({', '.join(towers)}) and stay in the source dtype: bitsandbytes quantizes Linear layers only"
        )
    return notes
