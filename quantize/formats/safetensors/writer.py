"""Entry points: ``write_safetensors`` (the pipeline's), ``predicted_bytes`` (the dry run's),
``validate_safetensors`` (checks before any work) and ``export_notes`` (for the manifest)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from quantize.errors import ExportError
from quantize.formats.safetensors.layout import (
    header_bytes,
    is_compressible,
    is_embedding,
    plan_layouts,
)

log = logging.getLogger(__name__)


def artifact_dir(out_dir: Path, options) -> Path:
    if options.format == "bitsandbytes":
        return Path(out_dir) / f"safetensors-bnb-{options.bnb}"
    return Path(out_dir) / "safetensors"


def validate_safetensors(plan, options) -> None:
    """Raise ``ExportError`` for what the chosen format cannot write (no weights are read)."""
    if options.format == "compressed-tensors":
        from quantize.formats.safetensors.compressed import validate_compressed

        validate_compressed(plan)
    elif options.format == "bitsandbytes":
        from quantize.formats.safetensors.bnb import validate_bnb

        validate_bnb(plan, options)
    else:
        raise ExportError(f"exports.safetensors.format: unknown format {options.format!r}; valid: compressed-tensors, bitsandbytes")


def write_safetensors(ctx, options) -> list[Path]:
    """Write the safetensors artifact for ``ctx`` and return the files written."""
    validate_safetensors(ctx.source.plan, options)
    out = artifact_dir(ctx.out_dir, options)
    if options.format == "bitsandbytes":
        from quantize.formats.safetensors.bnb import write_bnb

        files = write_bnb(ctx, options, out)
    else:
        from quantize.formats.safetensors.compressed import write_compressed

        files = write_compressed(ctx, options, out)
    for note in export_notes(ctx.source.plan, options):
        log.info("safetensors: %s", note)
    return files


def _side_bytes(source_folder) -> int:
    if source_folder is None:
        return 0
    from quantize.formats.safetensors.folder import side_files

    return sum(p.stat().st_size for p in side_files(Path(source_folder)))


def predicted_bytes(plan, options, source_folder: str | Path | None = None) -> int:
    """Bytes the artifact folder will hold: the weight files exactly up to header rounding,
    plus the copied tokenizer/processor files when ``source_folder`` is given."""
    if options.format == "bitsandbytes":
        from quantize.formats.safetensors.bnb import predicted_bnb_bytes

        return predicted_bnb_bytes(plan, options) + _side_bytes(source_folder)
    layouts = plan_layouts(plan)
    data = sum(lay.nbytes() for lay in layouts)
    n_shards = max(1, math.ceil(data / (options.max_shard_gb * (1 << 30))))
    total = data + header_bytes(layouts) + n_shards * 8
    if n_shards > 1:
        index = {lay_name: "model-00001-of-00001.safetensors" for lay in layouts for lay_name in lay.tensors()}
        total += len(json.dumps({"metadata": {"total_size": data}, "weight_map": index}, indent=2)) + 1
    # config.json with the quantization_config: a few KiB, dominated by the ignore list
    total += 8192 + sum(len(lay.module) + 8 for lay in layouts if lay.kind in ("original", "dequantized"))
    return total + _side_bytes(source_folder)


def export_notes(plan, options) -> list[str]:
    """What the manifest should say about this artifact beyond file sums."""
    notes = []
    dead = [e.name for e in plan.entries if e.dead]
    if dead:
        notes.append(
            f"safetensors: {len(dead)} dead k/v tensors of KV-consumer layers are not written "
            "(transformers builds those layers without k/v projections)"
        )
    if options.format == "bitsandbytes":
        from quantize.formats.safetensors.bnb import bnb_notes

        return notes + bnb_notes(plan, options)
    convs = [lay for lay in plan_layouts(plan) if lay.kind == "dequantized" and not is_compressible(lay.entry)]
    deq = [lay.entry.name for lay in convs]
    if deq:
        towers = sorted({lay.entry.tower for lay in convs})
        notes.append(
            f"safetensors: {len(deq)} quantized convolution weights ({', '.join(towers)}) are written dequantized "
            "in the source dtype and listed in quantization_config.ignore: compressed-tensors, transformers and "
            "vLLM compress only Linear and Embedding weights. Their values are the quantized ones; their size is not reduced"
        )
    asym = [lay.entry.name for lay in plan_layouts(plan) if lay.kind == "naive" and not lay.entry.scheme.symmetric]
    if asym:
        notes.append(
            f"safetensors: {len(asym)} asymmetric int tensors are stored naive-quantized (one byte per code, int8 zero "
            "points): transformers 5.24 with compressed-tensors 0.20 cannot load packed zero points"
        )
    emb = [lay.entry.name for lay in plan_layouts(plan) if lay.kind == "naive" and is_embedding(lay.entry)]
    if emb:
        notes.append(
            "safetensors: quantized embedding tables (" + ", ".join(emb) + ") are stored naive-quantized (one int8 "
            "per code plus scales): transformers loads them through compressed-tensors' Embedding support. vLLM "
            "quantizes Linear layers through compressed-tensors and was not available to check embeddings; for vLLM, "
            "keep these towers (recipe towers.per_layer_embeddings: keep)"
        )
    tied = [lay.entry.name for lay in plan_layouts(plan) if lay.kind == "dequantized" and lay.entry.tower == "token_embeddings"]
    if tied:
        notes.append(
            "safetensors: the token embedding table is tied to lm_head and is written dequantized in the source dtype: "
            "transformers ties lm_head to the stored int8 weight and its matmul fails otherwise"
        )
    return notes
