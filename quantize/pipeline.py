"""The one orchestrator: recipe -> plan -> calibration -> quantization -> exports -> manifest.

It owns the model, devices, hooks and progress; algorithms stay pure (``quantize.methods``) and
writers only pack (``quantize.formats``). The run writes into a temporary folder beside the
output and renames it at the very end, so a failed run leaves no output folder behind.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from quantize.atomic import atomic_folder
from quantize.errors import RecipeError
from quantize.manifest import build_manifest, model_hash, write_json_atomic
from quantize.model import Checkpoint, resolve_model
from quantize.plan import Plan, build_plan
from quantize.recipe import Recipe
from quantize.source import TensorSource

log = logging.getLogger(__name__)

CALIBRATED_METHODS = ("gptq", "awq")


@dataclass
class RunResult:
    plan: Plan
    model_folder: Path | None = None
    out_dir: Path | None = None
    artifacts: list[Path] = field(default_factory=list)
    manifest: dict | None = None


def prepare(recipe: Recipe, allow_pickle: bool = False) -> tuple[Checkpoint, Plan]:
    """Resolve the model and build the plan (no weights are read)."""
    _check_output(recipe)
    _check_calibration_paths(recipe)
    folder = resolve_model(recipe.model, allow_pickle=allow_pickle)
    ckpt = Checkpoint(folder)
    plan = build_plan(recipe, ckpt)
    _validate_exports(recipe, ckpt, plan)
    return ckpt, plan


def _check_calibration_paths(recipe: Recipe) -> None:
    """Fail in the first second, not after loading a model, when a calibration file is missing."""
    import glob

    cal = recipe.calibration
    for key, src in (("text", cal.text), ("images", cal.images), ("audio", cal.audio)):
        if src.source == "files" and not glob.glob(os.path.expanduser(src.path)):
            raise RecipeError(f"calibration.{key}.path: {src.path!r} does not exist (a file, folder or glob is expected)")


def _validate_exports(recipe: Recipe, ckpt: Checkpoint, plan: Plan) -> None:
    """Refuse, before any weight is read, what an export format cannot represent (the writers'
    own planning steps: llama.cpp's hard-coded Gemma 3n layout, mtmd's limits, layouts)."""
    from quantize.formats.base import ExportContext

    st = recipe.exports.safetensors
    if st is not None and st.enabled:
        from quantize.formats.safetensors.writer import validate_safetensors

        validate_safetensors(plan, st)
    gguf = recipe.exports.gguf
    if gguf is not None and gguf.enabled:
        from quantize.formats.gguf import plan_text

        ctx = ExportContext(recipe=recipe, source=TensorSource(ckpt, plan), out_dir=Path(recipe.output), provenance={})
        plan_text(ctx, gguf)
        resolve_mmproj(ctx, gguf)


def gguf_text_plan(recipe: Recipe, folder: Path, plan: Plan):
    """The text GGUF's tensor plan (names, GGUF types, bytes), computed without reading a weight."""
    from quantize.formats.base import ExportContext
    from quantize.formats.gguf import plan_text

    ctx = ExportContext(recipe=recipe, source=TensorSource(Checkpoint(folder), plan), out_dir=Path(recipe.output), provenance={})
    return plan_text(ctx, recipe.exports.gguf)


def resolve_mmproj(ctx, gguf) -> tuple[bool, str | None]:
    """Whether to write the vision mmproj, and why not when ``auto`` skips it. ``true`` raises
    what mtmd cannot run (the writer's own validation); ``auto`` turns that into a note."""
    from quantize.errors import ExportError
    from quantize.formats.gguf import mmproj

    if gguf.mmproj is False:
        return False, None
    try:
        mmproj.plan_mmproj(ctx, gguf)
    except ExportError as e:
        if gguf.mmproj is True:
            raise
        return False, f"GGUF: no vision mmproj written (mmproj: auto): {e}"
    return True, None


def _text_calibrated(e) -> bool:
    return e.quantized and e.tower == "text" and (e.scheme.method in CALIBRATED_METHODS or e.scheme.importance)


def _tower_calibrated(e) -> bool:
    return e.quantized and e.tower in ("vision", "audio") and e.scheme.importance


def needs_calibration(plan: Plan) -> bool:
    return any(_text_calibrated(e) or _tower_calibrated(e) for e in plan.entries)


def run(recipe: Recipe, *, dry_run: bool = False, allow_pickle: bool = False, progress: bool = True) -> RunResult:
    ckpt, plan = prepare(recipe, allow_pickle=allow_pickle)
    if dry_run:
        return RunResult(plan=plan, model_folder=ckpt.folder)

    out = Path(recipe.output)
    with atomic_folder(out) as tmp:
        result = _run_into(recipe, ckpt, plan, tmp, progress)
    result.out_dir = out
    result.artifacts = [out / p.relative_to(tmp) for p in result.artifacts]
    return result


def _run_into(recipe: Recipe, ckpt: Checkpoint, plan: Plan, out: Path, progress: bool) -> RunResult:
    from quantize.formats.base import ExportContext

    calib_manifest: dict | None = None
    seq = None
    importance: dict = {}
    if needs_calibration(plan) or recipe.kv_cache.fp8:
        calib_manifest, seq, importance = _calibrate(recipe, ckpt, plan, progress)
    source = TensorSource(
        ckpt,
        plan,
        precomputed=seq.tensors if seq else {},
        updated=seq.updated if seq else {},
        importance={**(seq.importance if seq else {}), **importance},
        kv_scales=seq.kv_scales if seq else {},
    )
    digest = model_hash(ckpt)
    provenance = {
        "recipe": recipe.name,
        "source_model": recipe.model,
        "model_sha256": digest,
        "tool": "gemma3n-quantize",
    }
    ctx = ExportContext(recipe=recipe, source=source, out_dir=out, provenance=provenance)
    artifacts: list[Path] = []
    notes: list[str] = list(plan.notes)
    if importance:
        notes.append(f"importance-weighted RTN: {len(importance)} vision/audio weights scaled by calibration activations")
    if recipe.exports.safetensors is not None and recipe.exports.safetensors.enabled:
        from quantize.formats.safetensors import write_safetensors

        log.info("writing safetensors (%s)", recipe.exports.safetensors.format)
        artifacts += write_safetensors(ctx, recipe.exports.safetensors)
        from quantize.formats.safetensors.writer import export_notes

        notes += export_notes(plan, recipe.exports.safetensors)
    if recipe.exports.gguf is not None and recipe.exports.gguf.enabled:
        from quantize.formats.gguf import write_gguf

        gguf = recipe.exports.gguf
        with_mmproj, why_not = resolve_mmproj(ctx, gguf)
        if why_not:
            log.warning("%s", why_not)
            notes.append(why_not)
        log.info("writing GGUF (%s%s)", gguf.mix, ", with vision mmproj" if with_mmproj else "")
        artifacts += write_gguf(ctx, gguf.model_copy(update={"mmproj": with_mmproj}))
        from quantize.formats.gguf import AUDIO_NOTE

        notes.append(AUDIO_NOTE)
    manifest = build_manifest(
        recipe=recipe,
        ckpt=ckpt,
        plan=plan,
        model_digest=digest,
        out_dir=out,
        artifacts=artifacts,
        calibration=calib_manifest,
        quantization_report=seq.report if seq else {},
        kv_scales=source.kv_scales,
        notes=notes,
    )
    write_json_atomic(out / "manifest.json", manifest)
    return RunResult(plan=plan, artifacts=artifacts, manifest=manifest)


def _calibrate(recipe: Recipe, ckpt: Checkpoint, plan: Plan, progress: bool):
    """Build the calibration set once; gather the towers' activation statistics (importance
    RTN), then calibrate and quantize the text decoder layer by layer (GPTQ / AWQ / importance).

    Returns the calibration manifest, the sequential result (or None) and the towers' statistics.
    """
    import torch
    from transformers import AutoProcessor, Gemma3nForConditionalGeneration

    from calibrate import build_calibration
    from quantize.sequential import quantize_text_decoder
    from quantize.tower_stats import tower_importance

    torch.manual_seed(recipe.seed)
    processor = AutoProcessor.from_pretrained(str(ckpt.folder))
    calib = build_calibration(recipe.calibration, processor, seed=recipe.seed)
    # The checkpoint's own dtype (bf16 for Google's E4B: 16 GB, not 32): the sequential engine
    # upcasts one layer at a time to fp32 for its statistics.
    model = Gemma3nForConditionalGeneration.from_pretrained(str(ckpt.folder), dtype="auto").eval()

    importance: dict = {}
    towers = {e.tower for e in plan.entries if _tower_calibrated(e)}
    if towers:
        log.info("collecting activation statistics of the %s tower(s)", " and ".join(sorted(towers)))
        importance = tower_importance(
            model,
            calib.images if "vision" in towers else None,
            calib.audio if "audio" in towers else None,
        )

    result = None
    if any(_text_calibrated(e) for e in plan.entries) or recipe.kv_cache.fp8:
        # Every quantized decoder linear goes through the engine, plain RTN too: later layers,
        # and KV consumers reading their producer's cache, must calibrate on the quantized model.
        schemes = {e.name: e.scheme for e in plan.entries if e.quantized and e.tower == "text"}
        batches = [{"input_ids": ids} for ids in calib.text] + list(calib.multimodal)
        result = quantize_text_decoder(
            model, schemes, batches, device=recipe.device, kv_fp8=recipe.kv_cache.fp8, progress=progress,
            compute_dtype=torch.float32,
        )
    del model
    return calib.manifest, result, importance


def _check_output(recipe: Recipe) -> None:
    """A run replaces an output folder; it never writes over a file."""
    out = Path(recipe.output)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output: {out} exists and is not a folder")
