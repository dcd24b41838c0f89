"""The one orchestrator: recipe -> plan -> calibration -> quantization -> exports -> manifest.

It owns the model, devices, hooks and progress; algorithms stay pure (``quantize.methods``) and
writers only pack (``quantize.formats``). The run writes into a temporary folder beside the
output and renames it at the very end, so a failed run leaves no output folder behind.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from quantize.atomic import atomic_folder, check_output, refuse_if_holds
from quantize.background import LowPriorityTask
from quantize.errors import ModelError, RecipeError
from quantize.evaluation import check_eval, check_eval_text, run_eval
from quantize.manifest import artifact_provenance, build_manifest, model_hash, write_json_atomic
from quantize.model import Checkpoint, resolve_model
from quantize.plan import CALIBRATED_METHODS, Plan, build_plan
from quantize.recipe import Recipe
from quantize.source import TensorSource

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    plan: Plan
    model_folder: Path | None = None
    out_dir: Path | None = None
    artifacts: list[Path] = field(default_factory=list)
    manifest: dict | None = None
    eval: dict | None = None  # the manifest's eval record; {"error": ...} when the evaluation failed
    # dry runs: the text decoder's calibration dtype and why (resolve_compute_dtype); None when
    # nothing in the decoder is calibrated
    compute_dtype: tuple[str, str] | None = None


def prepare(recipe: Recipe, allow_pickle: bool = False, *, out: Path | None = None,
            overwrite: bool = False) -> tuple[Checkpoint, Plan]:
    """Resolve the model and build the plan (no weights are read). ``out``: the folder the run
    will write, checked first so that a refusal comes in the first second (``None``: a dry
    run, which writes nothing)."""
    if out is not None:
        check_output(Path(out), overwrite)  # first: a refusal comes before the model is even resolved
    _check_calibration_paths(recipe)
    check_eval(recipe)
    folder = resolve_model(recipe.model, allow_pickle=allow_pickle)
    if out is not None:
        refuse_if_holds(Path(out), folder, "the model folder")
    ckpt = Checkpoint(folder)
    plan = build_plan(recipe, ckpt)
    _check_compute_dtype(recipe, ckpt, plan)
    _validate_exports(recipe, ckpt, plan)
    if out is not None:
        check_eval_text(recipe, ckpt.folder)
        if needs_calibration(plan) or recipe.kv_cache.fp8 or recipe.eval is not None:
            from quantize.device import calibration_device

            calibration_device(recipe.device)  # a GPU torch does not see: refused now, not after the export
    return ckpt, plan


def _check_calibration_paths(recipe: Recipe) -> None:
    """Fail in the first second, not after loading a model, when a calibration file is missing."""
    import glob

    cal = recipe.calibration
    for key, src in (("text", cal.text), ("images", cal.images), ("audio", cal.audio)):
        if src.source == "files" and not glob.glob(os.path.expanduser(src.path)):
            raise RecipeError(f"calibration.{key}.path: {src.path!r} does not exist (a file, folder or glob is expected)")


def _check_compute_dtype(recipe: Recipe, ckpt: Checkpoint, plan: Plan) -> None:
    """``compute_dtype: bfloat16`` only where it does what it says (``_bf16_refusal``)."""
    if recipe.compute_dtype == "bfloat16":
        refusal = _bf16_refusal(recipe, ckpt, plan)
        if refusal is not None:
            why, rest = refusal
            raise RecipeError(f"compute_dtype: bfloat16{why}{rest}")


def _bf16_refusal(recipe: Recipe, ckpt: Checkpoint, plan: Plan) -> tuple[str, str] | None:
    """Why a bf16 calibration forward would not do what it says (the phrase after "bfloat16",
    naming nothing on this machine: auto's reason goes into the manifest) and the rest of the
    error (what was found where, what to do instead), or None: the sequential engine must run
    (something in the decoder is calibrated), read weights bf16 holds exactly (GPTQ quantizes
    the layer's weights as the engine holds them), and absorb no AWQ scales (bf16 would round
    the norm and linear weights they are folded into)."""
    if not _runs_decoder_engine(recipe, plan):
        return (" sets the text decoder's calibration forward, and this recipe calibrates nothing there (no GPTQ, "
                "AWQ or importance in towers.text or overrides, no kv_cache.fp8)", ": remove the key")
    text = [e for e in plan.entries if e.quantized and e.tower == "text"]  # what the engine quantizes
    awq = sorted(e.name for e in text if e.scheme.method == "awq")
    if awq:
        return (f": AWQ folds its scales into norm and linear weights, which bfloat16 would round "
                f"({awq[0]}{' and others' if len(awq) > 1 else ''})", ": use float32 with AWQ")
    stored = sorted({ckpt.tensors[e.name].dtype for e in text} - {"BF16"})
    if stored:
        return (" needs the text decoder stored in bfloat16 (GPTQ would quantize rounded weights)",
                f"; {ckpt.folder}'s decoder linears are {', '.join(stored)}: use float32")
    return None


def resolve_compute_dtype(recipe: Recipe, ckpt: Checkpoint, plan: Plan) -> tuple[str, str]:
    """The dtype of the text decoder's calibration forward, and why (for the log and the
    manifest). ``auto`` is bfloat16 where an explicit ``bfloat16`` would be accepted and the
    calibration device multiplies bf16 in hardware (``quantize.device.native_bf16``), else
    float32: the model's own dtype where that is fast, the upcast where bf16 would be emulated
    or would round what GPTQ quantizes."""
    if recipe.compute_dtype != "auto":
        return recipe.compute_dtype, "set in the recipe"
    refusal = _bf16_refusal(recipe, ckpt, plan)
    if refusal is not None:
        return "float32", f"auto: float32, since bfloat16{refusal[0]}"
    from quantize.device import calibration_device, native_bf16

    native, found = native_bf16(calibration_device(recipe.device))
    return ("bfloat16" if native else "float32"), f"auto: {found}"


def _planned_compute_dtype(recipe: Recipe, ckpt: Checkpoint, plan: Plan) -> tuple[str, str] | None:
    """``resolve_compute_dtype`` for a dry run, which may plan for a device this machine lacks
    (auto then says it decides on the device at run time)."""
    if not _runs_decoder_engine(recipe, plan):
        return None
    try:
        return resolve_compute_dtype(recipe, ckpt, plan)
    except RecipeError as e:
        return "float32 or bfloat16", f"auto: decided on the device at run time; here {e}"


def _validate_exports(recipe: Recipe, ckpt: Checkpoint, plan: Plan) -> None:
    """Refuse, before any weight is read, what an export format cannot represent (the writers'
    own planning steps: llama.cpp's hard-coded Gemma 3n layout, mtmd's limits, layouts)."""
    from quantize.formats.base import ExportContext
    from quantize.kv_cache import validate_kv_cache

    validate_kv_cache(recipe)
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


def _runs_decoder_engine(recipe: Recipe, plan: Plan) -> bool:
    """Whether the sequential engine calibrates the text decoder (and so reads compute_dtype)."""
    return any(_text_calibrated(e) for e in plan.entries) or recipe.kv_cache.fp8


def _tower_calibrated(e) -> bool:
    return e.quantized and e.tower in ("vision", "audio") and e.scheme.importance


def needs_calibration(plan: Plan) -> bool:
    return any(_text_calibrated(e) or _tower_calibrated(e) for e in plan.entries)


def run(recipe: Recipe, *, dry_run: bool = False, allow_pickle: bool = False, progress: bool = True,
        into: Path | None = None, overwrite: bool = False) -> RunResult:
    """``into``: build the output folder there instead of at ``recipe.output``, which the manifest
    and the GGUF metadata still record, so the files equal a plain run's byte for byte (a sweep
    worker builds a variant on its own disk and ships the files to the driver).
    ``overwrite``: an existing output folder that this tool did not write (wholly) is moved
    aside to ``NAME.backup-N`` instead of refusing the run (see ``quantize.atomic``)."""
    out = Path(into) if into is not None else Path(recipe.output)
    ckpt, plan = prepare(recipe, allow_pickle=allow_pickle, out=None if dry_run else out, overwrite=overwrite)
    if dry_run:
        return RunResult(plan=plan, model_folder=ckpt.folder, compute_dtype=_planned_compute_dtype(recipe, ckpt, plan))

    with atomic_folder(out, overwrite=overwrite) as tmp:
        result = _run_into(recipe, ckpt, plan, tmp, progress)
    result.out_dir = out
    result.artifacts = [out / p.relative_to(tmp) for p in result.artifacts]
    return result


# Finished decoder layers' codes wait here for the writers (quantize.spill); inside the partial
# output folder, so a failed run removes it with everything else, and removed before the
# manifest lists the folder's files.
SPILL_DIR = ".spill"
# Text GGUF tensors encoded during the calibration (quantize.formats.gguf.preencode), the same way.
PREENCODE_DIR = ".preencoded"


def _run_into(recipe: Recipe, ckpt: Checkpoint, plan: Plan, out: Path, progress: bool) -> RunResult:
    """``out``: the partial folder of ``run``'s ``atomic_folder``, which removes it (spill
    included) when anything here fails."""
    spill = out / SPILL_DIR
    calib_manifest: dict | None = None
    seq = None
    importance: dict = {}
    hashing = preencoded = None
    try:
        if needs_calibration(plan) or recipe.kv_cache.fp8:
            # the checkpoint's sum, read while the calibration computes, and the GGUF tensors that
            # do not depend on it, encoded meanwhile (quantize.background)
            hashing = LowPriorityTask("model-hash", lambda stop: model_hash(ckpt, desc=None, workers=1, stop=stop))
            preencoded = _start_preencoding(recipe, ckpt, plan, out)
            try:
                calib_manifest, seq, importance = _calibrate(recipe, ckpt, plan, progress, spill)
            except BaseException:
                hashing.cancel()
                raise
        digest = hashing.result() if hashing is not None else model_hash(ckpt)
        return _export(recipe, ckpt, plan, out, spill, preencoded, calib_manifest, seq, importance, digest)
    finally:
        if preencoded is not None:
            preencoded.stop()


def _start_preencoding(recipe: Recipe, ckpt: Checkpoint, plan: Plan, out: Path):
    """The text GGUF's tensors that the calibration cannot change, encoding in the background
    (``quantize.formats.gguf.preencode``), or None when there is no text GGUF or no such tensor."""
    gguf = recipe.exports.gguf
    if gguf is None or not gguf.enabled:
        return None
    from quantize.formats.base import ExportContext
    from quantize.formats.gguf.preencode import PreEncoder

    ctx = ExportContext(recipe=recipe, source=TensorSource(ckpt, plan), out_dir=out, provenance={})
    pre = PreEncoder(ctx, gguf, out / PREENCODE_DIR)
    return pre if pre.start() else None


def _export(recipe: Recipe, ckpt: Checkpoint, plan: Plan, out: Path, spill: Path, preencoded, calib_manifest,
            seq, importance: dict, digest: str) -> RunResult:
    """``_run_into``'s writers, evaluation and manifest, once the calibration (if any) is done."""
    from quantize.formats.base import ExportContext

    source = TensorSource(
        ckpt,
        plan,
        precomputed=seq.tensors if seq else {},
        updated=seq.updated if seq else {},
        rescaled=seq.rescaled if seq else {},
        importance={**(seq.importance if seq else {}), **importance},
        # Every layer's cache scales (a KV consumer's are its producer's): writers need each layer's.
        kv_scales=seq.layer_kv_scales if seq else {},
    )
    provenance = artifact_provenance(recipe, digest)
    ctx = ExportContext(recipe=recipe, source=source, out_dir=out, provenance=provenance, preencoded=preencoded)
    artifacts: list[Path] = []
    gguf_codes: dict | None = None
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
        from quantize.formats.gguf import AUDIO_NOTE, text_code_sources

        notes.append(AUDIO_NOTE)
        if recipe.kv_cache.fp8:
            from quantize.kv_cache import GGUF_KV_NOTE

            log.warning("%s", GGUF_KV_NOTE)
            notes.append(GGUF_KV_NOTE)
        gguf_codes = text_code_sources(ctx, gguf)
    if preencoded is not None:
        preencoded.stop()
    # the writers are done; the manifest lists the folder as it stays
    shutil.rmtree(spill, ignore_errors=True)
    shutil.rmtree(out / PREENCODE_DIR, ignore_errors=True)
    evaluation = None
    if recipe.eval is not None:  # before the manifest, which points to the results
        evaluation = run_eval(recipe, ckpt.folder, out, artifacts)
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
        gguf_codes=gguf_codes,
        evaluation=evaluation,
    )
    write_json_atomic(out / "manifest.json", manifest)
    return RunResult(plan=plan, artifacts=artifacts, manifest=manifest, eval=evaluation)


def _calibrate(recipe: Recipe, ckpt: Checkpoint, plan: Plan, progress: bool, spill: Path):
    """Build the calibration set once; gather the towers' activation statistics (importance
    RTN), then calibrate and quantize the text decoder layer by layer (GPTQ / AWQ / importance).

    The model is streamed (``quantize.streamed_model``): each tower and each decoder layer is
    read from the checkpoint only while it runs, with the token tables' calibration rows, so
    memory is one layer's weights plus activations, not the whole model (16 GB for E4B); the
    finished layers' codes go to ``spill`` (a new folder) until the writers read them.
    Returns the calibration manifest, the sequential result (or None) and the towers' statistics.
    """
    import torch

    from calibrate import build_calibration
    from quantize.compat import check_transformers
    from quantize.memory import release_free_memory
    from quantize.sequential import quantize_text_decoder
    from quantize.spill import SpilledTensors
    from quantize.streamed_model import StreamedModel
    from quantize.tower_stats import tower_importance

    check_transformers()  # before minutes of loading: the engine relies on transformers internals
    torch.manual_seed(recipe.seed)
    processor = load_processor(ckpt.folder)
    calib = build_calibration(recipe.calibration, processor, seed=recipe.seed)
    batches = [{"input_ids": ids} for ids in calib.text] + list(calib.multimodal)
    # The checkpoint's own dtype (bf16 for Google's E4B): the sequential engine runs one layer at
    # a time in recipe.compute_dtype (fp32 by default: upcast), its statistics in fp32.
    streamed = StreamedModel(ckpt, [b["input_ids"] for b in batches])
    model = streamed.model

    importance: dict = {}
    manifest = dict(calib.manifest)
    towers = {e.tower for e in plan.entries if _tower_calibrated(e)}
    if towers:
        tower_dtype, why = _tower_dtype(streamed.dtype)
        if streamed.dtype == torch.bfloat16:  # the choice the manifest must state (float32 has none)
            manifest["tower_compute_dtype"] = {"used": str(tower_dtype).split(".")[-1], "why": why}
    for tower in sorted(towers):
        log.info("collecting activation statistics of the %s tower (%s)", tower, why)
        streamed.load_tower(tower, dtype=tower_dtype)
        try:
            importance.update(tower_importance(
                model,
                calib.images if tower == "vision" else None,
                calib.audio if tower == "audio" else None,
            ))
        finally:
            streamed.release_tower(tower)

    result = None
    if _runs_decoder_engine(recipe, plan):
        # Every quantized decoder linear goes through the engine, plain RTN too: later layers,
        # and KV consumers reading their producer's cache, must calibrate on the quantized model.
        schemes = {e.name: e.scheme for e in plan.entries if e.quantized and e.tower == "text"}
        dtype, why = resolve_compute_dtype(recipe, ckpt, plan)
        log.info("text decoder calibration forward in %s (%s)", dtype, why)
        manifest["decoder_compute_dtype"] = {"recipe": recipe.compute_dtype, "used": dtype, "why": why}
        spill.mkdir()
        result = quantize_text_decoder(
            model, schemes, batches, device=recipe.device, kv_fp8=recipe.kv_cache.fp8, progress=progress,
            compute_dtype=getattr(torch, dtype), streamed=streamed, spill=SpilledTensors(spill),
        )
    del model, streamed
    # the calibration's hidden states and last layer are freed: their heap pages go back before
    # the writers allocate theirs (quantize.memory)
    release_free_memory()
    return manifest, result, importance


def _tower_dtype(dtype):
    """The dtype the vision/audio towers' statistics forward runs in, and why: as stored, but
    float32 for a bf16 checkpoint on a CPU without bf16 instructions, where torch runs bf16
    convolutions in a slow reference loop (MobileNetV5 on the tiny model's few images: over 15
    minutes on an AVX2-only CPU, against seconds in float32)."""
    import torch

    from quantize.device import native_bf16

    if dtype != torch.bfloat16:
        return dtype, f"the checkpoint is stored in {str(dtype).split('.')[-1]}"
    native, why = native_bf16(torch.device("cpu"))
    if native:
        return dtype, f"bfloat16 as stored: {why}"
    return torch.float32, f"float32: {why}, and bf16 convolutions would run in a slow reference loop"


# What AutoProcessor reads: a tokenizer (either file) and the processor's own config (either file).
PROCESSOR_FILES = (("tokenizer.json", "tokenizer.model"), ("processor_config.json", "preprocessor_config.json"))


def load_processor(folder: Path):
    """The model folder's processor, or one line naming the files that are missing."""
    from transformers import AutoProcessor

    folder = Path(folder)
    missing = [" or ".join(group) for group in PROCESSOR_FILES if not any((folder / f).is_file() for f in group)]
    if missing:
        raise ModelError(f"{folder}: calibration needs the model's tokenizer and processor files; missing "
                         f"{'; '.join(missing)} (copy them from the model's original folder, e.g. google/gemma-3n-E4B-it)")
    try:
        return AutoProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{folder}: the tokenizer/processor files cannot be loaded ({first}); "
                         "calibration needs a Gemma 3n processor (tokenizer.json or tokenizer.model, processor_config.json)") from None
