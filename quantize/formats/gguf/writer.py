"""Plan -> validated list of GGUF tensors -> one file, streamed one tensor at a time.

Everything that can be refused is refused before a byte is written: llama.cpp's hard-coded
layout (``quantize.llamacpp_layout``), tensor names, row lengths against block sizes, and that
each exact type really holds the plan's codes. Then the header, metadata and tensor index are
written and each tensor is read, packed and appended alone, so peak memory stays near the
largest tensor. The file is written as ``<name>.partial`` and renamed at the end; a failure
removes the partial file, so an interrupted run leaves no ``.gguf``.

KV-shared layers: llama.cpp's loader requires ``blk.N.attn_k``, ``attn_v`` and ``attn_k_norm``
for every layer, but ``gemma3n.cpp`` never reads them for layers >= 20 (``hparams.has_kv(il)``
is false there; those layers take K/V from layers 18/19's cache). Google's checkpoints carry
dead weights there, transformers >= 5 drops them. Either way we write zeros in the cheapest type
the loader accepts (IQ1_S, 1.5625 bits per weight; Q4_0 or F16 where the row length does not
allow it; 1-D norms as F32): the file loads, and the numbers can never matter.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter

from quantize.errors import ExportError
from quantize.formats.gguf import blocks, kquants, mixes
from quantize.formats.gguf.names import TEXT_RULES, require_name
from quantize.llamacpp_layout import validate_layout
from quantize.manifest import remember_sha256
from quantize.model import glob_match
from quantize.qtensor import QuantizedTensor
from quantize.source import computed_method

log = logging.getLogger(__name__)

MULTIMODAL_TOWERS = ("vision", "audio", "embedders")


@dataclass
class Target:
    """One GGUF tensor: where its values come from and how they are packed."""

    gguf: str
    shape: tuple[int, ...]  # numpy order (GGUF stores it reversed as ggml's ne)
    sources: tuple[str, ...]  # checkpoint names (3 for stacked AltUp projections, 0 for placeholders)
    choice: mixes.Choice
    transform: str = ""
    layer: int | None = None
    pad_rows: int = 0  # rows appended (vocabulary padding): zeros, or row 0's bytes for ``pad_row0``
    method: str = "rtn"  # what produced the values: keep, rtn, gptq, awq (quantize.source.computed_method)
    dequantize: bool = False  # pack our dequantized weights rather than the computed model's float weights

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def nbytes(self) -> int:
        return self.rows * blocks.row_bytes(self.choice.qtype, self.cols)


@dataclass
class GGUFPlan:
    path: Path
    arch: str
    targets: list[Target]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _consumer_start(tc: dict) -> int:
    return int(tc["num_hidden_layers"]) - int(tc.get("num_kv_shared_layers", 0) or 0)


def plan_text(ctx, options) -> GGUFPlan:
    cfg = ctx.source.config
    tc = cfg["text_config"]
    warnings = [f"llama.cpp layout mismatch (written with force): {m}" for m in validate_layout(tc, options.force, f"{ctx.source.checkpoint.folder}/config.json")]
    n_layer = int(tc["num_hidden_layers"])
    vocab_size = int(tc["vocab_size"])
    hidden = int(tc["hidden_size"])
    kv_dim = int(tc["num_key_value_heads"]) * int(tc["head_dim"])
    first_consumer = _consumer_start(tc)
    mix = options.mix

    grouped: dict[str, dict] = {}
    notes: list[str] = []
    for e in ctx.source.plan.entries:
        if e.tower in MULTIMODAL_TOWERS or "vision_tower" in e.name or "audio_tower" in e.name or "embed_vision" in e.name or "embed_audio" in e.name:
            continue
        m = require_name(e.name, TEXT_RULES, "llama.cpp gemma3n")
        if m.gguf is None:
            continue
        g = grouped.setdefault(m.gguf, {"entries": {}, "transform": m.transform})
        g["entries"][m.stack_index if m.transform == "stack" else 0] = e

    targets: list[Target] = []
    refused: list[str] = []
    for gname, g in grouped.items():
        ents = [g["entries"][k] for k in sorted(g["entries"])]
        e0 = ents[0]
        transform = g["transform"]
        if transform == "stack":
            want = int(tc.get("altup_num_inputs", 4)) - 1
            if sorted(g["entries"]) != list(range(want)):
                raise ExportError(f"{gname}: needs checkpoint tensors 0..{want - 1}, found indices {sorted(g['entries'])}")
            if len({x.shape for x in ents}) != 1 or len({x.scheme.label() for x in ents}) != 1:
                raise ExportError(f"{gname}: the stacked AltUp projections differ in shape or scheme")
            shape = (len(ents), *e0.shape)
        else:
            shape = tuple(e0.shape)
        pad = 0
        if transform in ("pad_vocab", "pad_row0"):
            if shape[0] > vocab_size:
                raise ExportError(f"{e0.name}: {shape[0]} rows but text_config.vocab_size is {vocab_size}")
            pad = vocab_size - shape[0]
            shape = (vocab_size, *shape[1:])
        if len(shape) > 2 and transform != "stack":
            raise ExportError(f"{e0.name}: a {len(shape)}-D text tensor has no gemma3n GGUF layout")
        if e0.dead:
            targets.append(_placeholder(gname, shape, e0.layer, "dead k/v of a KV-shared layer (never read by llama.cpp)"))
            continue
        scheme = e0.scheme if e0.quantized else None
        named = mixes.named_type(gname, options.tensor_types)
        choice = mixes.choose(gname, len(shape), shape[-1], e0.layer, n_layer, mix, scheme, e0.dtype,
                              options.token_embeddings, options.per_layer_embeddings, named)
        method = computed_method(e0)
        deq = _dequantize(e0, method, choice, mix, named, gname, refused)
        if choice.note:
            notes.append(f"{gname}: {choice.note}")
        targets.append(Target(gname, shape, tuple(x.name for x in ents), choice, transform, e0.layer, pad, method, deq))

    if refused:
        raise ExportError(refused[0] + (f" (and {len(refused) - 1} more tensors)" if len(refused) > 1 else ""))
    have = {t.gguf for t in targets}
    for il in range(n_layer):
        for leaf, shape in (("attn_k.weight", (kv_dim, hidden)), ("attn_v.weight", (kv_dim, hidden)), ("attn_k_norm.weight", (int(tc["head_dim"]),))):
            name = f"blk.{il}.{leaf}"
            if name in have:
                continue
            if il < first_consumer:
                raise ExportError(f"checkpoint has no tensor for {name} (layer {il} computes its own K/V)")
            targets.append(_placeholder(name, shape, il, "absent in the checkpoint (transformers >= 5 drops it); never read by llama.cpp"))
    missing = sorted(set(_required_text_names(n_layer)) - {t.gguf for t in targets})
    if missing:
        raise ExportError(f"the checkpoint lacks tensors llama.cpp's gemma3n loader requires: {', '.join(missing[:10])}"
                          + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
    for t in targets:
        if not mixes.fits(t.choice.qtype, t.cols):
            raise ExportError(f"{t.gguf}: {t.cols} columns do not fit {t.choice.qtype.name} blocks of {GGML_QUANT_SIZES[t.choice.qtype][0]}")
    _check_rules_match(options.tensor_types, targets)
    n_ph = sum(1 for t in targets if not t.sources)
    if n_ph:
        notes.append(f"{n_ph} K/V tensors of KV-shared layers written as zero placeholders: llama.cpp's loader requires them, its graph never reads them")
    targets.sort(key=_order)
    name = f"{ctx.recipe.name}-{mix}.gguf"
    return GGUFPlan(Path(ctx.out_dir) / name, "gemma3n", targets, notes, warnings)


def _dequantize(e, method: str, choice: mixes.Choice, mix: str, named: str | None, gname: str, refused: list[str]) -> bool:
    """Whether a target packs our dequantized weights (True) or encodes the computed model's
    float weights (False) when its type does not hold our codes exactly; appends to ``refused``
    what would be rounded twice for nothing.

    - GPTQ: its codes are the calibrated result, and they cannot be re-encoded on another block
      grid without a second rounding that undoes GPTQ's error compensation (our encoder is not
      a GPTQ on the K-quant grid): float types take the dequantized values, block types are refused.
    - AWQ: the calibrated part is the scales, already in the float weights (``TensorSource.
      float_weight``): a block type encodes those weights once, on its own grid; float types
      under ``auto`` take the dequantized values, a type the recipe names takes the floats.
    - RTN: under ``auto`` a non-exact type reproduces our RTN values; a type the recipe names
      for this tensor (a mix or ``tensor_types``) is encoded from the float weights (with their
      importance)."""
    if not e.quantized or choice.exact:
        return False
    floating = choice.qtype in mixes.FLOATS
    if method == "gptq":
        if not floating:
            exact = mixes.exact_for_scheme(e.scheme, e.shape[-1])
            why = "a tensor_types rule" if named is not None else f"mix {mix}"
            refused.append(
                f"exports.gguf: {e.name} ({gname}) holds GPTQ {e.scheme.label()} codes but {why} gives it GGUF "
                f"{choice.qtype.name}, which cannot hold them: re-encoding would round twice. Valid: "
                + (f"{exact.name} (holds these codes exactly), " if exact is not None else "")
                + "F16/BF16/F32, or method rtn or awq for this tensor (encoded once on the GGUF type's grid)")
        return True
    if method == "awq":
        return floating and mix == "auto" and named is None
    return mix == "auto" and named is None


def _check_rules_match(rules, targets: list[Target]) -> None:
    """A ``tensor_types`` rule that names no tensor is a typo, not a no-op: refuse it."""
    names = [t.gguf for t in targets if t.sources and len(t.shape) > 1]
    for i, rule in enumerate(rules or ()):
        if not any(glob_match(n, rule.match) for n in names):
            raise ExportError(f"exports.gguf.tensor_types.{i}.match {rule.match} matches no quantizable GGUF tensor; "
                              f"names look like {', '.join(names[:3])}, blk.N.ffn_down.weight, per_layer_token_embd.weight")


def _placeholder(name: str, shape: tuple[int, ...], layer: int | None, why: str) -> Target:
    qtype = mixes.placeholder_type(shape[-1], len(shape))
    return Target(name, tuple(shape), (), mixes.Choice(qtype, note=f"placeholder: {why}"), "zeros", layer)


def _required_text_names(n_layer: int) -> list[str]:
    """What ``llama_model_gemma3n::load_arch_tensors`` creates without TENSOR_NOT_REQUIRED."""
    top = ["token_embd.weight", "altup_proj.weight", "altup_unembd_proj.weight", "per_layer_token_embd.weight",
           "per_layer_model_proj.weight", "per_layer_proj_norm.weight", "output_norm.weight"]
    leaves = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
              "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm", "inp_gate",
              "proj", "post_norm", "altup_correct_coef", "altup_correct_scale", "altup_predict_coef",
              "altup_router", "altup_router_norm", "laurel_l", "laurel_r", "laurel_post_norm"]
    return top + [f"blk.{i}.{leaf}.weight" for i in range(n_layer) for leaf in leaves]


def _order(t: Target):
    # llama.cpp does not care; a stable, readable order (globals first, then by layer)
    return (-1 if t.layer is None else t.layer, t.gguf)


# ---------------------------------------------------------------------------------------------
# packing


def _values(ctx, src: str, t: Target, rows: tuple[int, int] | None = None) -> torch.Tensor | QuantizedTensor:
    """What ``t`` packs from ``src``: the whole tensor, or rows ``rows`` of it when streaming."""
    if not t.choice.exact and not t.dequantize:
        # the computed model's floats (AWQ-rescaled where the calibration changed them): no need to quantize first
        return ctx.source.float_weight(src) if rows is None else ctx.source.float_rows(src, *rows)
    v = ctx.source.get(src) if rows is None else ctx.source.rows(src, *rows)
    if isinstance(v, QuantizedTensor) and not t.choice.exact:
        return v.dequantize()
    return v


STREAM_ELEMENTS = 1 << 23  # rows are read, quantized and packed in pieces of about this many values


def _pack(ctx, src: str, t: Target, v, background: bool = False) -> np.ndarray:
    """``background``: packed beside the calibration (``preencode``): on one thread, and no torch
    computation (an OpenMP team started from that thread would compete with the calibration's)."""
    qtype = t.choice.qtype
    if t.choice.exact:
        if not isinstance(v, QuantizedTensor) or blocks.exact_type(v) != qtype:
            got = v.scheme.label() if isinstance(v, QuantizedTensor) else "a float tensor"
            raise ExportError(f"{src}: the plan promised codes that {qtype.name} holds exactly, the source gave {got}")
        return blocks.pack_exact(v, qtype)
    w = _float32(v.detach(), background).reshape(-1, t.cols)
    if qtype in kquants.BYTES:
        imp = ctx.source.importance.get(src)
        imp = None if imp is None or imp.numel() != t.cols else imp.to(torch.float32).numpy()
        return kquants.encode_kquant(w, qtype, imp, threads=1 if background else None)
    return blocks.pack_float(w, qtype)


def _float32(v: torch.Tensor, numpy_only: bool) -> np.ndarray:
    """``v`` in fp32 as numpy; with ``numpy_only`` converted by numpy (bf16 widens to fp32
    exactly: its 16 bits are the high half of the fp32 word), else by torch."""
    if not numpy_only or v.dtype == torch.float32:
        return v.to(torch.float32).numpy()
    if v.dtype == torch.bfloat16:
        return (v.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return v.numpy().astype(np.float32)


def pieces(ctx, t: Target) -> list[tuple[str, tuple[int, int] | None]]:
    """How ``packed_chunks`` splits a target with sources: (source, rows of it or None for the
    whole tensor as computed), in file order. A source that can be produced row by row
    (``TensorSource.row_streamable``: RTN and kept tensors) is read, quantized and packed
    ``STREAM_ELEMENTS`` values at a time, so converting a 262144 x 8960 embedding table never
    holds more than a few hundred MB; results computed ahead (GPTQ) are packed from memory."""
    out: list[tuple[str, tuple[int, int] | None]] = []
    for src in t.sources:
        info = ctx.source.checkpoint.tensors[src]
        n_rows = info.shape[0] if info.shape else 1
        per_row = info.numel // max(n_rows, 1)
        if ctx.source.row_streamable(src) and info.numel > STREAM_ELEMENTS and per_row % t.cols == 0:
            step = max(1, STREAM_ELEMENTS // per_row)
            out += [(src, (r0, min(n_rows, r0 + step))) for r0 in range(0, n_rows, step)]
        else:
            out.append((src, None))
    return out


def pack_piece(ctx, t: Target, src: str, rng: tuple[int, int] | None, background: bool = False) -> np.ndarray:
    """One piece of ``pieces(ctx, t)`` packed: uint8 (rows, row bytes of the target's type);
    ``background``: see ``_pack`` (the same bytes)."""
    part = _pack(ctx, src, t, _values(ctx, src, t, rng), background)
    if part.shape[1] != blocks.row_bytes(t.choice.qtype, t.cols):
        raise ExportError(f"{t.gguf}: packed {part.shape} from {src} does not fit {t.choice.qtype.name} {t.shape}")
    return part


@dataclass(frozen=True)
class Resume:
    """The first ``pieces`` pieces of a target, packed elsewhere (``preencode``): ``rows`` rows
    in all, the first of which is ``first`` (its bytes: ``pad_row0`` copies it)."""

    pieces: int
    rows: int
    first: np.ndarray


def packed_chunks(ctx, t: Target, resume: Resume | None = None):
    """The bytes of one target as consecutive uint8 (rows, row bytes) pieces (see ``pieces``),
    from piece ``resume.pieces`` on when the first ones were packed elsewhere. Padded vocabulary
    rows come last, as zeros or (``pad_row0``) as copies of the first row's bytes: ggml packs
    each row on its own, so a copy is that row packed."""
    qtype = t.choice.qtype
    rb = blocks.row_bytes(qtype, t.cols)
    if not t.sources:
        step = max(1, STREAM_ELEMENTS // t.cols)
        for r0 in range(0, t.rows, step):
            yield np.zeros((min(step, t.rows - r0), rb), np.uint8)
        return
    done, first = (resume.rows, resume.first) if resume is not None else (0, None)
    for src, rng in pieces(ctx, t)[resume.pieces if resume is not None else 0:]:
        part = pack_piece(ctx, t, src, rng)
        if done + part.shape[0] + t.pad_rows > t.rows:
            raise ExportError(f"{t.gguf}: packed {part.shape} from {src} does not fit {qtype.name} {t.shape}")
        if first is None:
            first = part[:1].copy()
        done += part.shape[0]
        yield part
    if done + t.pad_rows != t.rows:
        raise ExportError(f"{t.gguf}: packed {done} rows (+{t.pad_rows} padding), expected {t.rows} for {t.shape}")
    if t.pad_rows:
        if t.transform == "pad_row0":
            yield np.repeat(first, t.pad_rows, axis=0)
        else:
            yield np.zeros((t.pad_rows, rb), np.uint8)


class _StreamedTensor:
    """What ``GGUFWriter.write_tensor_data`` needs of an array (``nbytes``, ``tofile``), with the
    bytes produced piece by piece: the writer keeps its alignment and bookkeeping, we keep peak
    memory at one piece instead of one tensor. Pieces encoded ahead (``ctx.preencoded``, see
    ``preencode``) are copied from their file; the rest are packed here."""

    def __init__(self, ctx, t: Target, io: ThreadPoolExecutor):
        self.ctx, self.t, self.nbytes, self.io = ctx, t, t.nbytes, io

    def tofile(self, fout) -> None:
        written = 0
        pre = self.ctx.preencoded
        done = pre.take(self.t, self.ctx.source) if pre is not None else None
        if done is not None:
            written += done.copy_to(fout)
        # Each piece is written on the I/O thread while the next one is packed here (a write
        # releases the GIL): at most two pieces alive, and the file's bytes in the same order.
        pending = None
        try:
            for part in packed_chunks(self.ctx, self.t, done.resume if done is not None else None):
                part = np.ascontiguousarray(part)
                if pending is not None:
                    pending.result()
                pending = self.io.submit(fout.write, part.data)
                written += part.nbytes
        finally:
            if pending is not None:
                pending.result()  # never leave a write in flight (also when packing failed)
        if written != self.nbytes:
            raise ExportError(f"{self.t.gguf}: wrote {written} bytes, the tensor index promised {self.nbytes}")


class _Sha256File:
    """The output file, hashing what is written through it (on the I/O thread for the tensor
    pieces, beside the packing), so the manifest's sha256 needs no second read of the file."""

    def __init__(self, f):
        self._f, self._h = f, hashlib.sha256()

    def write(self, b) -> int:
        self._h.update(b)
        return self._f.write(b)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def write_plan(ctx, plan: GGUFPlan, add_metadata) -> Path:
    """Write ``plan`` to ``plan.path`` via a ``.partial`` file; ``add_metadata(writer)`` adds keys."""
    from tqdm import tqdm

    final = plan.path
    tmp = final.with_name(final.name + ".partial")
    final.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(path=None, arch=plan.arch)
    try:
        add_metadata(w)
        for t in plan.targets:
            w.add_tensor_info(t.gguf, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.choice.qtype)
        w.open_output_file(tmp)
        (fout,) = w.fout  # one file: no split options are set
        hashed = _Sha256File(fout)
        w.fout = [hashed]  # every byte, the header's too, passes through it
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gguf-write") as io:
            for t in tqdm(plan.targets, desc=f"writing {final.name}", unit="tensor", leave=False):
                w.write_tensor_data(_StreamedTensor(ctx, t, io))
        w.close()
        os.replace(tmp, final)
        remember_sha256(final, hashed.hexdigest())
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %s (%d tensors, %.1f MiB)", final, len(plan.targets), final.stat().st_size / 2**20)
    return final


def type_counts(plan: GGUFPlan) -> dict[T, int]:
    """Weights per type over the block weights (embedding tables excluded: llama.cpp names a file
    by its layers' type, e.g. Q4_0 even though its embeddings are Q6_K or Q8_0)."""
    counts: dict[T, int] = {}
    for t in plan.targets:
        if t.sources and len(t.shape) > 1 and t.gguf not in mixes.EMBEDDINGS:
            counts[t.choice.qtype] = counts.get(t.choice.qtype, 0) + int(np.prod(t.shape))
    return counts


def code_sources(plan: GGUFPlan, source) -> dict[str, dict[str, str]]:
    """For the manifest: per GGUF tensor, the method and the grid that produced its values and
    what was encoded (matrices, and any tensor the calibration changed, e.g. AWQ's norms)."""
    out = {}
    for t in plan.targets:
        changed = any(source.changed(s) for s in t.sources)
        if not t.sources or (len(t.shape) < 2 and not changed):
            continue
        if t.choice.exact:
            what = "calibrated codes" if t.method in ("gptq", "awq") else "RTN codes"
        elif t.dequantize:
            what = "dequantized codes" + ("" if t.choice.qtype in mixes.FLOATS else ", rounded again")
        else:
            what = "AWQ-rescaled float weights" if changed else "float weights"
        out[t.gguf] = {"method": t.method, "grid": t.choice.qtype.name, "source": what}
    return out
