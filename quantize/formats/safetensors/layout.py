"""How each plan entry lands in the compressed-tensors folder, decided from the plan alone.

compressed-tensors compresses ``nn.Linear`` and ``nn.Embedding`` weights only
(``compressed_tensors.compressors.base.COMPRESSIBLE_MODULE_TYPES``); transformers and vLLM have
no quantized convolution for it. In Gemma 3n every 2-D ``*.weight`` is a Linear or an Embedding
and every weight of 3 or more dimensions is a convolution (vision MobileNetV5, the audio
subsampler and its depthwise conv1d), so the layout follows from names and shapes, before any
weight is read: the dry run can print exact sizes.

Kinds:
- ``dead``: a KV-consumer layer's unused k/v (transformers drops them on load): not written.
- ``original``: kept tensors (norms, 1-D, ``keep`` schemes) in their own dtype.
- ``packed``: int4 / int8 codes packed into int32 (``pack-quantized``) with fp16 scales.
- ``naive``: int4 / int8 codes one int8 each (``naive-quantized``) with fp16 scales (and int8
  zero points), for asymmetric schemes and for Embeddings. Asymmetric: transformers 5.24 +
  compressed-tensors 0.20 build the packed layout with an unpacked zero point (rows, groups) and
  refuse the packed (rows*bits/32, groups) one on load (size mismatch).
  Embeddings: Packed Embeddings lose their ``weight`` attribute, and transformers' weight init of
  Gemma 3n's scaled embeddings then fails (``...ScaledWordEmbedding has no attribute weight``);
  naive-quantized keeps ``weight`` (as int8), which loads.
- ``fp8``: e4m3 values (``float-quantized``) with fp32 scales.
- ``dequantized``: a quantized convolution, or the token embedding table when lm_head is tied to
  it (transformers ties lm_head to the int8 ``weight`` and its matmul fails), written as ``QuantizedTensor.dequantize()`` in the
  source dtype: the values are the quantized model's, the bytes are not smaller.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from quantize.plan import Plan, PlanEntry

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1}
# Rough size of one tensor's entry in a safetensors JSON header beyond its name (dtype, shape,
# offsets, quotes). Used only for the size prediction; names dominate anyway.
HEADER_BYTES_PER_TENSOR = 64
_EMBEDDING_RE = re.compile(r"(\.embed_tokens|\.embed_tokens_per_layer|\.embedding)\.weight$")


@dataclass(frozen=True)
class TensorLayout:
    entry: PlanEntry
    kind: str  # dead | original | packed | naive | fp8 | dequantized

    @property
    def module(self) -> str:
        """The module that owns the tensor (``a.b.weight`` -> ``a.b``)."""
        return self.entry.name.rsplit(".", 1)[0]

    def tensors(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Names, shapes and safetensors dtypes this entry writes."""
        e, m = self.entry, self.module
        if self.kind == "dead":
            return {}
        if self.kind in ("original", "dequantized"):
            return {e.name: (e.shape, e.dtype)}
        rows = e.shape[0]
        cols = math.prod(e.shape[1:])
        s = e.scheme
        n_groups = cols // s.group_size if s.strategy == "group" else 1
        if self.kind == "fp8":
            scale_shape = (1,) if s.strategy == "tensor" else (rows, 1)
            return {f"{m}.weight": ((rows, cols), "F8_E4M3"), f"{m}.weight_scale": (scale_shape, "F32")}
        if self.kind == "naive":
            out = {f"{m}.weight": ((rows, cols), "I8"), f"{m}.weight_scale": ((rows, n_groups), "F16")}
            if not s.symmetric:
                out[f"{m}.weight_zero_point"] = ((rows, n_groups), "I8")
            return out
        bits = s.bits
        out = {
            f"{m}.weight_packed": ((rows, math.ceil(cols * bits / 32)), "I32"),
            f"{m}.weight_scale": ((rows, n_groups), "F16"),
            f"{m}.weight_shape": ((2,), "I64"),
        }
        if not s.symmetric:
            out[f"{m}.weight_zero_point"] = ((math.ceil(rows * bits / 32), n_groups), "I32")
        return out

    def nbytes(self) -> int:
        return sum(math.prod(shape) * DTYPE_BYTES[dt] for shape, dt in self.tensors().values())


def is_compressible(entry: PlanEntry) -> bool:
    """A Linear or Embedding weight (2-D ``*.weight``); everything else is a conv or a vector."""
    return len(entry.shape) == 2 and entry.name.endswith(".weight")


def is_embedding(entry: PlanEntry) -> bool:
    """nn.Embedding weights: token and per-layer tables, the multimodal embedders' tables."""
    return _EMBEDDING_RE.search(entry.name) is not None


def layout_of(entry: PlanEntry, tied_lm_head: bool = True) -> TensorLayout:
    if entry.dead:
        return TensorLayout(entry, "dead")
    if not entry.quantized:
        return TensorLayout(entry, "original")
    if not is_compressible(entry):
        return TensorLayout(entry, "dequantized")
    if tied_lm_head and entry.name.endswith("language_model.embed_tokens.weight"):
        return TensorLayout(entry, "dequantized")
    if entry.scheme.type == "fp8":
        return TensorLayout(entry, "fp8")
    return TensorLayout(entry, "naive" if is_embedding(entry) or not entry.scheme.symmetric else "packed")


def has_tied_lm_head(plan: Plan) -> bool:
    """Gemma 3n ties lm_head to embed_tokens; a checkpoint with its own lm_head.weight does not."""
    return not any(e.name.endswith("lm_head.weight") for e in plan.entries)


def plan_layouts(plan: Plan) -> list[TensorLayout]:
    tied = has_tied_lm_head(plan)
    return [layout_of(e, tied) for e in plan.entries]


def header_bytes(layouts: list[TensorLayout]) -> int:
    return sum(len(n) + HEADER_BYTES_PER_TENSOR for lay in layouts for n in lay.tensors())
