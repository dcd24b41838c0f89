"""GGUF metadata for the ``gemma3n`` architecture, from the checkpoint's ``text_config``.

The keys llama.cpp's converter writes (``Gemma3NModel.set_gguf_parameters`` and its bases),
which ``src/models/gemma3n.cpp`` and ``llama-model.cpp`` read: context length, widths, heads,
RoPE bases (full and sliding), RMS epsilon, head dims, sliding window and its per-layer pattern,
AltUp, per-layer input width, shared KV layers and the activation sparsity scales (the last two are
written for completeness; llama.cpp hard-codes them, see ``quantize.llamacpp_layout``).
"""
from __future__ import annotations

import json

from gguf import GGUFWriter

from quantize.errors import ExportError

PREFIX = "quantize."  # our own provenance keys


def _req(tc: dict, key: str):
    if key not in tc:
        raise ExportError(f"config.json: text_config.{key} is missing; the gemma3n GGUF needs it")
    return tc[key]


def add_text_keys(w: GGUFWriter, tc: dict) -> None:
    n = int(_req(tc, "num_hidden_layers"))
    w.add_context_length(int(tc.get("max_position_embeddings", 32768)))
    w.add_embedding_length(int(_req(tc, "hidden_size")))
    w.add_block_count(n)
    ff = _req(tc, "intermediate_size")
    # as the config gives it, like the converter: a per-layer list (E4B's config, and any config
    # transformers >= 5 saves) becomes an array, which llama.cpp reads as well as a single value
    w.add_feed_forward_length([int(x) for x in ff] if isinstance(ff, list) else int(ff))
    w.add_head_count(int(_req(tc, "num_attention_heads")))
    w.add_head_count_kv(int(_req(tc, "num_key_value_heads")))
    w.add_layer_norm_rms_eps(float(tc.get("rms_norm_eps", 1e-6)))
    head_dim = int(_req(tc, "head_dim"))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    rope = tc.get("rope_parameters") or {}
    full = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    sliding = rope.get("sliding_attention", {}) if isinstance(rope, dict) else {}
    theta = full.get("rope_theta", tc.get("rope_theta", 1_000_000.0))
    w.add_rope_freq_base(float(theta))
    theta_swa = sliding.get("rope_theta", tc.get("rope_local_base_freq"))
    if theta_swa is not None:
        w.add_rope_freq_base_swa(float(theta_swa))
    if tc.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(tc["final_logit_softcapping"]))
    w.add_sliding_window(int(_req(tc, "sliding_window")))
    w.add_sliding_window_pattern([t == "sliding_attention" for t in _req(tc, "layer_types")])
    w.add_altup_active_idx(int(tc.get("altup_active_idx", 0)))
    w.add_altup_num_inputs(int(tc.get("altup_num_inputs", 4)))
    w.add_embedding_length_per_layer_input(int(_req(tc, "hidden_size_per_layer_input")))
    w.add_shared_kv_layers(int(tc.get("num_kv_shared_layers", 0) or 0))
    pattern = tc.get("activation_sparsity_pattern") or [0.0] * n
    w.add_activation_sparsity_scale(sparsity_scales(pattern))


def sparsity_scales(pattern) -> list[float]:
    """The standard normal's quantile of each layer's sparsity, computed as the converter does
    (``torch.distributions.Normal(0, 1).icdf`` on a float32 tensor), so the bits agree: -inf
    for a dense layer (p = 0). llama.cpp does not read the key today (it hard-codes E2B/E4B's
    pattern, see ``quantize.llamacpp_layout``); a reader written against the converter's files
    will expect these values."""
    import torch

    normal = torch.distributions.normal.Normal(0, 1)
    return [normal.icdf(torch.tensor(float(p), dtype=torch.float32)).item() for p in pattern]


def add_vocab(w: GGUFWriter, vocab) -> None:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    vocab.special.add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)


def model_name(provenance: dict, recipe_json: dict) -> str:
    """``general.name``: the recipe's name."""
    return str(provenance.get("recipe") or recipe_json.get("name") or "gemma3n")


def add_provenance(w: GGUFWriter, provenance: dict, recipe_json: dict, notes: list[str], warnings: list[str]) -> None:
    if provenance.get("model"):
        w.add_string(PREFIX + "source_model", str(provenance["model"]))
    for k, v in sorted(provenance.items()):
        if k != "model" and isinstance(v, (str, int, float, bool)):
            w.add_string(PREFIX + f"provenance.{k}", str(v))
    w.add_string(PREFIX + "recipe", json.dumps(recipe_json, sort_keys=True, default=str))
    if notes:
        w.add_array(PREFIX + "notes", list(notes))
    if warnings:
        w.add_array(PREFIX + "warnings", list(warnings))
