"""Which GGUF type each tensor gets: named mixes as llama.cpp's ``llama_model_quantize`` picks
them (``src/llama-quant.cpp``), and ``auto``, which follows our own schemes.

Rules taken from llama.cpp for the tensors Gemma 3n has:

- never quantized: 1-D tensors, ``*_norm.weight``, ``altup*``, ``laurel*`` and
  ``per_layer_model_proj`` (llama.cpp keeps the converter's F16; F32 under the F32 mix);
- ``altup_correct_coef`` and ``altup_predict_coef`` are F32 whatever the mix: llama.cpp's
  converter writes them so for every ``--outtype`` (``conversion/base.py``, its always-F32 list),
  and ``llama-quantize`` keeps them; kept (not quantized) under ``auto`` too;
- ``token_embd`` and ``per_layer_token_embd`` (embeddings are tied, so they count as the output
  tensor): Q6_K unless the mix is Q8_0 (or a float mix); settable per file;
- ``attn_v`` and ``ffn_down`` get Q6_K in "more bits" layers under Q4_K_M / Q5_K_M
  (``use_more_bits``: the first and last eighth and every third layer between), Q5_K in the first
  layers under Q4_K_S;
- a row length that the type's block does not divide falls back (Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, then F16).

``auto``: a quantized tensor whose codes a GGUF type holds exactly (symmetric int4 / int8 with
groups that are multiples of 32 or per channel -> Q4_0 / Q8_0; asymmetric int4 -> Q4_1) takes that
type; asymmetric int8 becomes Q8_0 (RTN: re-quantized from our dequantized weights; AWQ: its
rescaled float weights; GPTQ: refused, see ``writer._dequantize``); fp8 has no GGUF
type and becomes F16 of the dequantized weights; kept matrices become F16 (BF16 when the source
is BF16, so nothing is lost).
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as FT

from quantize.model import glob_match
from quantize.schemes import QuantScheme

MIX_DEFAULT = {
    "Q8_0": T.Q8_0, "Q4_0": T.Q4_0, "Q4_K_M": T.Q4_K, "Q4_K_S": T.Q4_K,
    "Q5_K_M": T.Q5_K, "Q6_K": T.Q6_K, "F16": T.F16, "F32": T.F32,
}
MIX_FILE_TYPE = {
    "Q8_0": FT.MOSTLY_Q8_0, "Q4_0": FT.MOSTLY_Q4_0, "Q4_K_M": FT.MOSTLY_Q4_K_M, "Q4_K_S": FT.MOSTLY_Q4_K_S,
    "Q5_K_M": FT.MOSTLY_Q5_K_M, "Q6_K": FT.MOSTLY_Q6_K, "F16": FT.MOSTLY_F16, "F32": FT.ALL_F32,
}
TYPE_FILE_TYPE = {
    T.F32: FT.ALL_F32, T.F16: FT.MOSTLY_F16, T.BF16: FT.MOSTLY_BF16, T.Q8_0: FT.MOSTLY_Q8_0,
    T.Q4_0: FT.MOSTLY_Q4_0, T.Q4_1: FT.MOSTLY_Q4_1, T.Q5_0: FT.MOSTLY_Q5_0, T.Q5_1: FT.MOSTLY_Q5_1,
    T.Q4_K: FT.MOSTLY_Q4_K_M, T.Q5_K: FT.MOSTLY_Q5_K_M, T.Q6_K: FT.MOSTLY_Q6_K,
    T.Q2_K: FT.MOSTLY_Q2_K, T.Q3_K: FT.MOSTLY_Q3_K_M,
}
# llama.cpp's fallbacks for rows that do not fit 256-value super-blocks (llama-quant.cpp); it
# gives Q2_K/Q3_K IQ4_NL, which we do not write: Q4_0 has the same 4.5 bits per weight.
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
FLOATS = (T.F32, T.F16, T.BF16)
NEVER_QUANTIZED = ("_norm.weight", "altup", "laurel", "per_layer_model_proj")
ALWAYS_F32 = ("altup_correct_coef", "altup_predict_coef")
EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")


@dataclass(frozen=True)
class Choice:
    qtype: T
    exact: bool = False  # written from our codes and scales, bit for bit
    note: str = ""


def fits(qtype: T, cols: int) -> bool:
    return cols % GGML_QUANT_SIZES[qtype][0] == 0


def with_fallback(qtype: T, cols: int) -> T:
    if fits(qtype, cols):
        return qtype
    fb = FALLBACK.get(qtype)
    if fb is not None and fits(fb, cols):
        return fb
    return T.F16


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def placeholder_type(cols: int, ndim: int) -> T:
    """Cheapest type whose all-zero bytes decode to zeros and that every llama.cpp backend of the
    last two years runs: IQ1_S (1.5625 bits per weight; its block scale d = 0 zeroes the block).
    The newer Q1_0 (1.125) is smaller but unknown to older llama.cpp builds and GPU backends."""
    if ndim == 1:
        return T.F32
    for t in (T.IQ1_S, T.Q4_0):
        if fits(t, cols):
            return t
    return T.F16


def exact_for_scheme(s: QuantScheme, cols: int) -> T | None:
    if cols % 32 or s.type not in ("int4", "int8"):
        return None
    if s.strategy == "group" and s.group_size % 32:
        return None
    if s.type == "int4":
        return T.Q4_0 if s.symmetric else T.Q4_1
    return T.Q8_0 if s.symmetric else None


def float_type(mix: str, source_dtype: str) -> T:
    if mix == "F32":
        return T.F32
    return T.BF16 if source_dtype == "BF16" and mix == "auto" else T.F16


def named_type(gguf_name: str, rules) -> str | None:
    """The type the last matching ``tensor_types`` rule (``.match`` globs, ``.type``) names, or None."""
    found = None
    for rule in rules or ():
        if glob_match(gguf_name, rule.match):
            found = rule.type
    return found


def choose(
    gguf_name: str, ndim: int, cols: int, layer: int | None, n_layer: int, mix: str,
    scheme: QuantScheme | None, source_dtype: str,
    token_embd: str | None = None, per_layer_embd: str | None = None, named: str | None = None,
) -> Choice:
    """The GGUF type of one (non-placeholder) text tensor. ``scheme`` None means kept.

    Precedence: 1-D tensors are F32; then the embedding options; then ``named``, the type a
    ``tensor_types`` rule gives this tensor (``named_type``); then the mix."""
    if ndim == 1:
        return Choice(T.F32)
    override = {"token_embd.weight": token_embd, "per_layer_token_embd.weight": per_layer_embd}.get(gguf_name)
    if override is None:
        override = named
    exact = exact_for_scheme(scheme, cols) if scheme is not None and scheme.is_quantized else None
    if override is not None:
        t = T[override]
        if not fits(t, cols):
            return Choice(with_fallback(t, cols), note=f"{override} does not fit {cols} columns; fell back")
        return Choice(t, exact=(t == exact))
    kept = scheme is None or not scheme.is_quantized
    if any(k in gguf_name for k in ALWAYS_F32) and (mix != "auto" or kept):
        return Choice(T.F32)
    if any(k in gguf_name for k in NEVER_QUANTIZED) and mix != "auto":
        return Choice(float_type(mix, source_dtype))

    if mix == "auto":
        if scheme is None or not scheme.is_quantized:
            return Choice(float_type(mix, source_dtype))
        if exact is not None:
            return Choice(exact, exact=True)
        if scheme.type == "fp8":
            return Choice(T.F16, note="fp8 has no GGUF type: written as F16 of the dequantized weights")
        if fits(T.Q8_0, cols) and scheme.type == "int8":
            # what is encoded (our dequantized RTN values, AWQ's rescaled floats) depends on the
            # method that really ran: writer._dequantize decides, the manifest's gguf.tensors says
            return Choice(T.Q8_0, note=f"{scheme.label()} has no exact GGUF type: re-encoded as Q8_0")
        return Choice(T.F16, note=f"{scheme.label()} ({cols} columns) has no exact GGUF type: F16 of the dequantized weights")

    base = MIX_DEFAULT[mix]
    if base in FLOATS:
        return Choice(base)
    t = base
    if gguf_name in EMBEDDINGS:
        t = T.Q8_0 if base == T.Q8_0 or not fits(T.Q6_K, cols) else T.Q6_K
    elif gguf_name.endswith("attn_v.weight") and layer is not None:
        if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layer):
            t = T.Q6_K
        elif mix == "Q4_K_S" and layer < 4:
            t = T.Q5_K
    elif gguf_name.endswith("ffn_down.weight") and layer is not None:
        if mix in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layer):
            t = T.Q6_K
        elif mix == "Q4_K_S" and layer < n_layer // 8:
            t = T.Q5_K
    t2 = with_fallback(t, cols)
    note = "" if t2 == t else f"{cols} columns do not fit {t.name}; llama.cpp's fallback {t2.name}"
    return Choice(t2, exact=(t2 == exact), note=note)


def file_type(mix: str, counts: dict[T, int]) -> FT:
    """``general.file_type``: the mix's, or for ``auto`` the type holding most weights."""
    if mix in MIX_FILE_TYPE:
        return MIX_FILE_TYPE[mix]
    quant = {t: n for t, n in counts.items() if t not in FLOATS and t in TYPE_FILE_TYPE}
    pool = quant or {t: n for t, n in counts.items() if t in TYPE_FILE_TYPE}
    if not pool:
        return FT.ALL_F32
    return TYPE_FILE_TYPE[max(pool, key=pool.get)]
