"""GGUF export for llama.cpp: the Gemma 3n text model and its vision mmproj.

``write_gguf(ctx, options)`` validates everything first (llama.cpp's hard-coded Gemma 3n layout,
names, types, mtmd's limits), then streams ``<name>-<mix>.gguf`` and, when asked,
``mmproj-<name>-<type>.gguf``. Imports: ``gguf``, numpy, torch and ``quantize`` only.

Audio: llama.cpp (as vendored in llama-cpp-python 0.3.36) cannot run Gemma 3n's audio tower —
its converter stops on ``subsample_conv_projection.conv_N.norm`` and mtmd declares the
``gemma3na`` projector without implementing a graph for it — so the audio tower is never put in
the mmproj (the file's metadata says so); it ships in the safetensors export.
"""
from __future__ import annotations

import logging
from pathlib import Path

from quantize.formats.gguf import keys, mixes
from quantize.formats.gguf.general import add_general
from quantize.formats.gguf.vocab import load_vocab
from quantize.formats.gguf.writer import GGUFPlan, code_sources, plan_text, type_counts, write_plan

log = logging.getLogger(__name__)

AUDIO_NOTE = (
    "Gemma 3n audio is not in this GGUF: llama.cpp (llama-cpp-python 0.3.36) declares the gemma3na "
    "projector but implements no graph for it, and its converter cannot map the audio tower's "
    "subsample_conv_projection norms. Use the safetensors export for audio."
)


def _recipe_json(ctx) -> dict:
    """The recipe as the file records it: no output folder and no local paths, so the same
    inputs give the same bytes wherever they are written (``quantize.manifest.recipe_record``)."""
    from quantize.manifest import recipe_record

    return recipe_record(ctx.recipe)


def write_gguf(ctx, options) -> list[Path]:
    """Write the text GGUF (and the vision mmproj when ``options.mmproj``); returns the paths."""
    from quantize.formats.gguf import mmproj

    text = plan_text(ctx, options)
    mm = mmproj.plan_mmproj(ctx, options) if options.mmproj else None  # validated before writing anything
    tc = ctx.source.config["text_config"]
    vocab = load_vocab(ctx.source.checkpoint.folder, int(tc["vocab_size"]))
    recipe = _recipe_json(ctx)

    def text_meta(w):
        add_general(w, ctx.source.checkpoint.folder, keys.model_name(ctx.provenance, recipe), [t.shape for t in text.targets])
        keys.add_text_keys(w, tc)
        keys.add_vocab(w, vocab)
        w.add_file_type(int(mixes.file_type(options.mix, type_counts(text))))
        keys.add_provenance(w, ctx.provenance, recipe, text.notes + [AUDIO_NOTE], text.warnings)
        w.add_string(keys.PREFIX + "mix", options.mix)

    out = [write_plan(ctx, text, text_meta)]
    if mm is not None:
        out.append(mmproj.write_mmproj(ctx, mm, recipe))
    return out


def text_code_sources(ctx, options) -> dict[str, dict[str, str]]:
    """The manifest's GGUF section: per text tensor, the method and GGUF grid that produced its
    values and what was encoded (``writer.code_sources``); the plan is recomputed, no weight is read."""
    return code_sources(plan_text(ctx, options), ctx.source)


def describe_text_plan(plan: GGUFPlan) -> str:
    """One line for the dry run: the text GGUF's tensor data bytes and weights per GGUF type
    (the header and metadata add a few hundred KB for the vocabulary)."""
    import numpy as np

    weights: dict[str, int] = {}
    for t in plan.targets:
        key = t.choice.qtype.name + ("" if t.sources else " (placeholders)")
        weights[key] = weights.get(key, 0) + int(np.prod(t.shape))
    by_type = ", ".join(f"{k} {v:,}" for k, v in sorted(weights.items(), key=lambda kv: -kv[1]))
    return f"predicted GGUF text model ({plan.path.name}): {sum(t.nbytes for t in plan.targets):,} bytes of tensor data; weights by type: {by_type}"


__all__ = ["write_gguf", "GGUFPlan", "plan_text", "describe_text_plan", "text_code_sources", "AUDIO_NOTE"]
