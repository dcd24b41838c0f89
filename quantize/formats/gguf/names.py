"""Checkpoint tensor names -> llama.cpp's GGUF names for Gemma 3n, with the transform each needs.

Data only. Names follow ``gguf``'s ``MODEL_TENSORS[GEMMA3N]`` and llama.cpp's converter
(``conversion/gemma.py``: ``Gemma3NModel`` and ``Gemma3nVisionAudioModel``). Transforms:

- ``pad_vocab``: rows padded with zeros up to ``text_config.vocab_size`` (the multimodal token
  slots; llama.cpp needs ``token_embd`` and ``per_layer_token_embd`` at the full vocabulary);
- ``pad_row0``: the same, padded with copies of row 0 instead: the per-layer table, whose
  multimodal rows transformers never reads (``get_per_layer_inputs`` maps every id past
  ``vocab_size_per_layer_input`` to 0, the pad token), while llama.cpp looks a token such as
  ``<end_of_image>`` up in its own row (the converter pads zeros there, a different input);
- ``stack``: the three ``altup_projections.{0,1,2}`` (and ``altup_unembed_projections``) become
  one (3, n, n) tensor, index order kept;
- ``gamma4d``: MobileNetV5 ``layer_scale.gamma`` (and the stem conv bias) written as
  (1, C, 1, 1) so that mtmd's ``ggml_mul`` can broadcast it (llama.cpp's converter leaves the
  blocks' gammas 1-D, which fails mtmd's warm-up with ``GGML_ASSERT(ggml_can_repeat(b, a))``);
- ``drop``: not written (``v_norm`` has no weight in llama.cpp: it uses a plain RMS norm).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from quantize.errors import ExportError

_LM = r"model\.language_model\."
_BLK = _LM + r"layers\.(?P<bid>\d+)\."


@dataclass(frozen=True)
class NameRule:
    pattern: re.Pattern
    gguf: str | None  # None: dropped
    transform: str = ""  # "", "pad_vocab", "pad_row0", "stack", "gamma4d", "drop"
    stack_index: int | None = None


def _r(p: str, gguf: str | None, transform: str = "") -> NameRule:
    return NameRule(re.compile(p + r"$"), gguf, transform)


TEXT_RULES: tuple[NameRule, ...] = (
    _r(_LM + r"embed_tokens\.weight", "token_embd.weight", "pad_vocab"),
    _r(_LM + r"embed_tokens_per_layer\.weight", "per_layer_token_embd.weight", "pad_row0"),
    _r(_LM + r"per_layer_model_projection\.weight", "per_layer_model_proj.weight"),
    _r(_LM + r"per_layer_projection_norm\.weight", "per_layer_proj_norm.weight"),
    _r(_LM + r"norm\.weight", "output_norm.weight"),
    _r(_LM + r"altup_projections\.(?P<idx>\d)\.weight", "altup_proj.weight", "stack"),
    _r(_LM + r"altup_unembed_projections\.(?P<idx>\d)\.weight", "altup_unembd_proj.weight", "stack"),
    _r(_BLK + r"input_layernorm\.weight", "blk.{bid}.attn_norm.weight"),
    _r(_BLK + r"self_attn\.q_proj\.weight", "blk.{bid}.attn_q.weight"),
    _r(_BLK + r"self_attn\.k_proj\.weight", "blk.{bid}.attn_k.weight"),
    _r(_BLK + r"self_attn\.v_proj\.weight", "blk.{bid}.attn_v.weight"),
    _r(_BLK + r"self_attn\.o_proj\.weight", "blk.{bid}.attn_output.weight"),
    _r(_BLK + r"self_attn\.q_norm\.weight", "blk.{bid}.attn_q_norm.weight"),
    _r(_BLK + r"self_attn\.k_norm\.weight", "blk.{bid}.attn_k_norm.weight"),
    _r(_BLK + r"self_attn\.v_norm\.weight", None, "drop"),
    _r(_BLK + r"post_attention_layernorm\.weight", "blk.{bid}.post_attention_norm.weight"),
    _r(_BLK + r"pre_feedforward_layernorm\.weight", "blk.{bid}.ffn_norm.weight"),
    _r(_BLK + r"post_feedforward_layernorm\.weight", "blk.{bid}.post_ffw_norm.weight"),
    _r(_BLK + r"mlp\.gate_proj\.weight", "blk.{bid}.ffn_gate.weight"),
    _r(_BLK + r"mlp\.up_proj\.weight", "blk.{bid}.ffn_up.weight"),
    _r(_BLK + r"mlp\.down_proj\.weight", "blk.{bid}.ffn_down.weight"),
    _r(_BLK + r"per_layer_input_gate\.weight", "blk.{bid}.inp_gate.weight"),
    _r(_BLK + r"per_layer_projection\.weight", "blk.{bid}.proj.weight"),
    _r(_BLK + r"post_per_layer_input_norm\.weight", "blk.{bid}.post_norm.weight"),
    _r(_BLK + r"altup\.correction_coefs\.weight", "blk.{bid}.altup_correct_coef.weight"),
    _r(_BLK + r"altup\.correct_output_scale", "blk.{bid}.altup_correct_scale.weight"),
    _r(_BLK + r"altup\.prediction_coefs\.weight", "blk.{bid}.altup_predict_coef.weight"),
    _r(_BLK + r"altup\.modality_router\.weight", "blk.{bid}.altup_router.weight"),
    _r(_BLK + r"altup\.router_norm\.weight", "blk.{bid}.altup_router_norm.weight"),
    _r(_BLK + r"laurel\.linear_left\.weight", "blk.{bid}.laurel_l.weight"),
    _r(_BLK + r"laurel\.linear_right\.weight", "blk.{bid}.laurel_r.weight"),
    _r(_BLK + r"laurel\.post_laurel_norm\.weight", "blk.{bid}.laurel_post_norm.weight"),
    # tied with embed_tokens: llama.cpp duplicates token_embd when output.weight is absent
    _r(r"(model\.)?(language_model\.)?lm_head\.weight", None, "drop"),
)

_VT = r"model\.vision_tower\.timm_model\."
_VB = _VT + r"blocks\.(?P<bid>\d+)\.(?P<sid>\d+)\."
_BLOCK_LEAVES = (
    "conv_exp.weight", "bn1.weight", "conv_pwl.weight", "bn2.weight",
    "dw_start.conv.weight", "dw_start.bn.weight", "dw_mid.conv.weight", "dw_mid.bn.weight",
    "pw_exp.conv.weight", "pw_exp.bn.weight", "pw_proj.conv.weight", "pw_proj.bn.weight",
    "attn.query.proj.weight", "attn.key.proj.weight", "attn.value.proj.weight", "attn.output.proj.weight",
    "attn.key.down_conv.weight", "attn.key.norm.weight", "attn.value.down_conv.weight",
    "attn.value.norm.weight", "norm.weight",
)

VISION_RULES: tuple[NameRule, ...] = (
    *(_r(_VB + re.escape(leaf), "v.blk.{bid}.{sid}." + leaf) for leaf in _BLOCK_LEAVES),
    _r(_VB + r"layer_scale\.gamma", "v.blk.{bid}.{sid}.layer_scale.gamma", "gamma4d"),
    _r(_VT + r"conv_stem\.conv\.weight", "v.conv_stem.conv.weight"),
    _r(_VT + r"conv_stem\.conv\.bias", "v.conv_stem.conv.bias", "gamma4d"),
    _r(_VT + r"conv_stem\.bn\.weight", "v.conv_stem.bn.weight"),
    _r(_VT + r"msfa\.ffn\.pw_exp\.conv\.weight", "v.msfa.ffn.pw_exp.conv.weight"),
    _r(_VT + r"msfa\.ffn\.pw_exp\.bn\.weight", "v.msfa.ffn.pw_exp.bn.weight"),
    _r(_VT + r"msfa\.ffn\.pw_proj\.conv\.weight", "v.msfa.ffn.pw_proj.conv.weight"),
    _r(_VT + r"msfa\.ffn\.pw_proj\.bn\.weight", "v.msfa.ffn.pw_proj.bn.weight"),
    _r(_VT + r"msfa\.norm\.weight", "v.msfa.norm.weight"),
    _r(r"model\.embed_vision\.embedding_projection\.weight", "mm.input_projection.weight"),
    _r(r"model\.embed_vision\.soft_embedding_norm\.weight", "mm.soft_emb_norm.weight"),
    # hard-token embedding table and its norm serve text-side vision token ids, which mtmd never
    # feeds (images arrive as soft embeddings): llama.cpp's converter does not write them either
    _r(r"model\.embed_vision\.(embedding|hard_embedding_norm)\.weight", None, "drop"),
)


@dataclass(frozen=True)
class Mapped:
    gguf: str | None
    transform: str
    stack_index: int | None = None


def map_name(name: str, rules: tuple[NameRule, ...]) -> Mapped | None:
    """The GGUF name for a checkpoint tensor under ``rules``, or None when no rule matches."""
    for rule in rules:
        m = rule.pattern.match(name)
        if m is None:
            continue
        if rule.gguf is None:
            return Mapped(None, "drop")
        groups = m.groupdict()
        idx = int(groups["idx"]) if groups.get("idx") is not None else None
        return Mapped(rule.gguf.format(**{k: v for k, v in groups.items() if v is not None}), rule.transform, idx)
    return None


def require_name(name: str, rules: tuple[NameRule, ...], runtime: str) -> Mapped:
    """Like ``map_name``, but a checkpoint tensor no rule knows is an error naming it: writing
    the file without it would give llama.cpp a different model than the checkpoint's."""
    m = map_name(name, rules)
    if m is None:
        raise ExportError(f"{name}: no {runtime} tensor name for this checkpoint tensor (see quantize/formats/gguf/names.py)")
    return m
