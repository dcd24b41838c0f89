"""The vision mmproj for llama.cpp's multimodal library (mtmd), projector type ``gemma3nv``.

What mtmd (llama-cpp-python 0.3.36) needs, and what we do about its limits:

- tensor names and hyper-parameters as llama.cpp's converter writes them
  (``Gemma3nVisionAudioModel``): ``v.*`` MobileNetV5 tensors, ``mm.input_projection.weight``,
  ``mm.soft_emb_norm.weight``; ``clip.vision.image_size`` from the processor (768) and
  ``patch_size = image_size / image_seq_length`` so that mtmd counts 256 image tokens; mean 0 and
  std 1 (MobileNetV5 only rescales to [0, 1]);
- every ``layer_scale.gamma`` (and the stem conv bias) as (1, C, 1, 1): the converter leaves the
  blocks' gammas 1-D and mtmd then fails its warm-up with ``GGML_ASSERT(ggml_can_repeat(b, a))``;
- types: mtmd runs MobileNetV5's convolutions with ``ggml_conv_2d_direct`` / ``ggml_conv_2d_dw``
  on F16/F32 kernels, and a 1x1 kernel's rows (``ne[0]`` = 1) cannot hold a quantization block,
  so the tower is F16 (F32 under the F32 mix; 1-D tensors and the stem always F32, the input
  projection F16, as the converter forces). Quantized vision schemes are written as F16 of their
  dequantized weights (a note in the metadata says so);
- mtmd takes the mmproj's output width from ``mm_input_proj_w->ne[0]`` for ``gemma3nv`` — the
  vision width, not the text width — and refuses a text model of another width. So a model whose
  text ``hidden_size`` differs from the vision ``hidden_size`` (2048 in E2B and E4B) is refused
  here, before anything is written;
- audio is left out: mtmd declares ``gemma3na`` but has no graph for it.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T

from quantize.errors import ExportError
from quantize.formats.gguf import keys, mixes
from quantize.formats.gguf.general import add_general
from quantize.formats.gguf.names import VISION_RULES, require_name
from quantize.formats.gguf.writer import GGUFPlan, Target, write_plan

PROJECTOR = "gemma3nv"


def _processor(folder: Path) -> dict:
    for name in ("processor_config.json", "preprocessor_config.json"):
        p = folder / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ExportError(f"{p}: not valid JSON ({e})") from None
            return {**data, **data.get("image_processor", {})}
    return {}


def image_geometry(folder: Path) -> tuple[int, int, int]:
    """(image_size, patch_size, image_seq_length) as llama.cpp's converter derives them."""
    proc = _processor(folder)
    size = (proc.get("size") or {}).get("height", 768)
    seq = int(proc.get("image_seq_length", 256))
    return int(size), int(size) // seq, seq


def check_mtmd_limits(cfg: dict, where: str) -> None:
    """Refuse what mtmd cannot run (see the module docstring)."""
    vc = cfg.get("vision_config")
    if not vc:
        raise ExportError(f"{where}: no vision_config; set exports.gguf.mmproj: false for a text-only model")
    text_hidden = int(cfg["text_config"]["hidden_size"])
    vision_hidden = int(vc.get("hidden_size", 2048))
    if text_hidden != vision_hidden:
        raise ExportError(
            f"{where}: text hidden_size {text_hidden} != vision hidden_size {vision_hidden}. llama.cpp's mtmd "
            f"(llama-cpp-python 0.3.36, clip_n_mmproj_embd for gemma3nv) takes the mmproj's output width from the "
            f"input projection's vision axis and refuses such a model ('mismatch between text model and mmproj'). "
            f"Set exports.gguf.mmproj: false (vision stays available through the safetensors export)"
        )


def plan_mmproj(ctx, options) -> GGUFPlan:
    check_mtmd_limits(ctx.source.config, f"{ctx.source.checkpoint.folder}/config.json")
    return vision_plan(ctx, options)


def vision_plan(ctx, options) -> GGUFPlan:
    """The mmproj's tensors (names, shapes, types), without mtmd's width check."""
    mix = options.mix
    float_t = T.F32 if mix == "F32" else T.F16
    targets: list[Target] = []
    notes: list[str] = []
    requantized = []
    for e in ctx.source.plan.entries:
        if not (e.name.startswith("model.vision_tower.") or e.name.startswith("model.embed_vision.")):
            continue
        m = require_name(e.name, VISION_RULES, "mtmd gemma3nv")
        if m.gguf is None:
            continue
        shape = tuple(e.shape)
        if m.transform == "gamma4d":
            if len(shape) != 1:
                raise ExportError(f"{e.name}: expected a 1-D layer scale or bias, got shape {shape}")
            shape = (1, shape[0], 1, 1)
        if len(e.shape) == 1 or "conv_stem" in m.gguf:
            qtype = T.F32
        else:
            qtype = float_t
        deq = e.quantized and (mix == "auto" or e.scheme.method in ("gptq", "awq"))
        if e.quantized and mix == "auto":
            requantized.append(e.name)
        targets.append(Target(m.gguf, shape, (e.name,), mixes.Choice(qtype), m.transform, None, 0,
                              e.scheme.method if e.quantized else "keep", deq))
    have = {t.gguf for t in targets}
    for need in ("mm.input_projection.weight", "mm.soft_emb_norm.weight", "v.conv_stem.conv.weight", "v.msfa.norm.weight"):
        if need not in have:
            raise ExportError(f"{ctx.source.checkpoint.folder}: no checkpoint tensor for mtmd's required {need}")
    if requantized:
        notes.append(f"{len(requantized)} quantized vision tensors written as {float_t.name} of their dequantized weights: "
                     "mtmd's MobileNetV5 convolutions take F16/F32 kernels only")
    targets.sort(key=lambda t: t.gguf)
    name = f"mmproj-{ctx.recipe.name}-{float_t.name.lower()}.gguf"
    return GGUFPlan(Path(ctx.out_dir) / name, "clip", targets, notes)


def write_mmproj(ctx, plan: GGUFPlan, recipe_json: dict) -> Path:
    from quantize.formats.gguf import AUDIO_NOTE

    cfg = ctx.source.config
    vc = cfg["vision_config"]
    image_size, patch_size, _ = image_geometry(Path(ctx.source.checkpoint.folder))
    hidden = int(vc.get("hidden_size", 2048))
    f16 = any(t.choice.qtype == T.F16 for t in plan.targets if t.gguf.startswith("v.blk"))

    def meta(w):
        add_general(w, ctx.source.checkpoint.folder, keys.model_name(ctx.provenance, recipe_json),
                    [t.shape for t in plan.targets], kind=gguf.GGUFType.MMPROJ)
        w.add_file_type(1 if f16 else 0)
        w.add_clip_has_vision_encoder(True)
        w.add_clip_has_audio_encoder(False)
        w.add_clip_projector_type(PROJECTOR)
        w.add_vision_projection_dim(int(cfg["text_config"]["hidden_size"]))
        w.add_vision_image_size(image_size)
        w.add_vision_patch_size(patch_size)
        w.add_vision_embedding_length(hidden)
        w.add_vision_feed_forward_length(int(vc.get("intermediate_size", hidden)) * 4)
        w.add_vision_block_count(128)  # the converter's placeholder: MobileNetV5 has no transformer blocks
        w.add_vision_head_count(int(vc.get("num_attention_heads", 8)))
        w.add_vision_attention_layernorm_eps(float(vc.get("rms_norm_eps", vc.get("layer_norm_eps", 1e-6))))
        w.add_vision_image_mean([0.0, 0.0, 0.0])
        w.add_vision_image_std([1.0, 1.0, 1.0])
        keys.add_provenance(w, ctx.provenance, recipe_json, plan.notes + [AUDIO_NOTE], plan.warnings)

    return write_plan(ctx, plan, meta)
