"""``fit``: measure, optimise, write a plain recipe, run it.

1. plan the text GGUF with every text tower kept (so that each tensor is encoded once, from the
   float weights, in the type chosen here) and list the groups (``measure.Group``);
2. the budget in bytes for the file (``budget``), minus what is not chosen here (norms, AltUp,
   LAuReL, the per-layer model projection in F16, the KV placeholders, the metadata);
3. measure weight errors and sensitivities (streamed probes), pick types by exact DP (``optimise.allocate``);
4. write ``<output>.fit.yaml`` beside the output folder: a plain recipe with explicit
   ``exports.gguf.tensor_types`` (reproduces the GGUF without measuring) and the prediction in
   ``exports.gguf.fitted``; then run it like ``quantize run`` (its manifest records both the
   predicted KL, in the recipe, and the measured one, in ``eval``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from quantize.errors import RecipeError
from quantize.fit.budget import Breakdown, Budget, compute_buffer_bytes, kv_cache_bytes, parse_budget
from quantize.fit.devices import get_device
from quantize.fit.measure import Group, candidate_types
from quantize.fit.spec import FitSpec

log = logging.getLogger(__name__)

KEEP_TOWERS = ("text", "token_embeddings", "per_layer_embeddings", "per_layer_projections", "altup_laurel",
               "vision", "audio", "embedders")
HEADER = "# written by gemma3n-quantize fit: a plain recipe (edit and `python -m quantize run` it; no measuring)\n"


@dataclass
class FitResult:
    spec: FitSpec
    budget_bytes: int
    fixed_bytes: int
    metadata_bytes: int
    groups: list[Group]
    choice: dict[str, str] = field(default_factory=dict)
    predicted_kl: float | None = None
    breakdown: Breakdown | None = None
    recipe_path: Path | None = None
    run: object = None  # pipeline.RunResult

    @property
    def chosen_bytes(self) -> int:
        return sum(g.bytes[self.choice[g.name]] for g in self.groups)


def base_data(recipe) -> dict:
    """The recipe as YAML data, GGUF-only, every tower kept (fit chooses the text types itself)."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    data["towers"] = {k: "keep" for k in KEEP_TOWERS}
    data["overrides"] = []
    data.pop("ignore", None)
    data["kv_cache"] = {"fp8": False}
    gguf = dict(data["exports"].get("gguf") or {})
    for k in ("fit", "fitted", "token_embeddings", "per_layer_embeddings"):
        gguf.pop(k, None)
    gguf.update(mix="auto", tensor_types=[])
    data["exports"] = {"gguf": gguf}
    return data


def pinned_types(recipe, name: str) -> str | None:
    """A type the user fixed for this GGUF tensor (the embedding options win, as in the writer)."""
    from quantize.formats.gguf.mixes import named_type

    g = recipe.exports.gguf
    if g is None:
        return None
    fixed = {"token_embd.weight": g.token_embeddings, "per_layer_token_embd.weight": g.per_layer_embeddings}.get(name)
    return fixed or named_type(name, g.tensor_types)


def plan_groups(recipe, allow_pickle: bool = False):
    """(kept recipe, checkpoint, GGUF text plan, groups, bytes not chosen here); reads no weight."""
    from gguf import GGMLQuantizationType as T

    from quantize.formats.gguf import blocks, mixes
    from quantize.pipeline import gguf_text_plan, prepare
    from quantize.recipe import parse_recipe

    kept = parse_recipe(base_data(recipe), "fit")
    ckpt, plan = prepare(kept, allow_pickle=allow_pickle)
    gplan = gguf_text_plan(kept, ckpt.folder, plan)
    groups, fixed = [], 0
    for t in gplan.targets:
        if not t.sources or len(t.shape) != 2 or any(k in t.gguf for k in mixes.NEVER_QUANTIZED):
            fixed += t.nbytes
            continue
        pin = pinned_types(recipe, t.gguf)
        types = [pin] if pin else [q for q in candidate_types() if mixes.fits(T[q], t.cols)]
        nbytes = {q: t.rows * blocks.row_bytes(T[q], t.cols) for q in types}
        types.sort(key=lambda q: (nbytes[q], q))
        groups.append(Group(t.gguf, t.sources, t.rows, t.cols, t.rows * t.cols, types, nbytes, pin))
    return kept, ckpt, gplan, groups, fixed


def real_weights(gplan) -> int:
    """Weights of the text GGUF, placeholders excluded."""
    import numpy as np

    return sum(int(np.prod(t.shape)) for t in gplan.targets if t.sources)


def metadata_allowance(tc: dict, n_tensors: int) -> int:
    """Header, metadata and tensor index: an upper estimate (the vocabulary dominates: each token's
    text, score and type), so that the file, not only its tensors, fits the budget."""
    # measured on the tiny model: 145,568 bytes for 4,352 tokens and 607 tensors (about 25 per token)
    return 64 * 1024 + 32 * int(tc["vocab_size"]) + 96 * n_tensors


def mmproj_bytes(kept, ckpt) -> int:
    from quantize.errors import ExportError
    from quantize.formats.base import ExportContext
    from quantize.formats.gguf import mmproj
    from quantize.plan import build_plan
    from quantize.recipe import parse_recipe
    from quantize.source import TensorSource

    data = base_data(kept)
    data["exports"]["gguf"]["mmproj"] = True
    r = parse_recipe(data, "fit")
    ctx = ExportContext(recipe=r, source=TensorSource(ckpt, build_plan(r, ckpt)), out_dir=Path(r.output), provenance={})
    try:
        return sum(t.nbytes for t in mmproj.plan_mmproj(ctx, r.exports.gguf).targets)
    except ExportError as e:
        raise RecipeError(f"fit: vision asked (--vision, fit.vision) but no mmproj llama.cpp can run is possible for this model; valid: vision off. Why: {e}") from None


def resolve_budget(spec: FitSpec, kept, ckpt, weights: int) -> tuple[int, Breakdown | None]:
    """Bytes for the text GGUF file; ``weights``: its weights (bits per weight count them all, as llama.cpp does)."""
    tc = ckpt.text_config
    if spec.device is not None:
        bd = Breakdown(get_device(spec.device), spec.context, spec.vision, kv_cache_bytes(tc, spec.context),
                       compute_buffer_bytes(tc), mmproj_bytes(kept, ckpt) if spec.vision else 0)
        return bd.weights, bd
    b: Budget = parse_budget(spec.budget, "fit.budget")
    if b.bytes is not None:
        return b.bytes, None
    return int(b.bpw * weights / 8), None


def probe_texts(recipe, folder: Path, n: int):
    import torch

    from calibrate.text import load_documents, sample_text
    from quantize.pipeline import load_processor

    proc = load_processor(folder)
    tok = getattr(proc, "tokenizer", None) or proc
    src = recipe.calibration.text.model_copy(update={"n_samples": min(n, recipe.calibration.text.n_samples)})
    docs, _ = load_documents(src)
    return [torch.tensor([s.input_ids], dtype=torch.long) for s in sample_text(src, docs, tok, recipe.seed)]


def fit(recipe, spec: FitSpec, *, dry_run: bool = False, allow_pickle: bool = False, overwrite: bool = False,
        run_eval: bool = True) -> FitResult:
    kept, ckpt, gplan, groups, fixed = plan_groups(recipe, allow_pickle)
    meta = metadata_allowance(ckpt.text_config, len(gplan.targets))
    budget, breakdown = resolve_budget(spec, kept, ckpt, real_weights(gplan))
    res = FitResult(spec, budget, fixed, meta, groups, breakdown=breakdown)
    free = budget - fixed - meta
    least = sum(g.bytes[g.types[0]] for g in groups)
    if free < least:
        where = f" (device {spec.device} at {spec.context} tokens leaves {budget:,} bytes for the text GGUF)" if spec.device else ""
        raise RecipeError(f"fit: budget {budget:,} bytes{where} is below the smallest text GGUF this model allows "
                          f"({fixed + meta + least:,} bytes: every group at its cheapest type, plus {fixed + meta:,} fixed); "
                          f"valid: at least {fixed + meta + least:,} bytes")
    out_path = recipe_path(recipe)
    if not dry_run:  # refuse now, not after measuring: the recipe file's place and the output folder
        from quantize.atomic import check_output

        check_recipe_path(out_path)
        check_output(Path(recipe.output), overwrite)
    if recipe.exports.safetensors is not None and recipe.exports.safetensors.enabled:
        log.warning("fit writes the GGUF only: the fitted recipe has no safetensors export")
    if free >= sum(g.bytes[g.types[-1]] for g in groups):
        # nothing to trade: every group gets its largest type, no measurement needed
        log.info("fit: the budget holds every group at its largest type; nothing to measure")
        res.choice = {g.name: g.types[-1] for g in groups}
        res.predicted_kl = None
        return res if dry_run else _write_and_run(recipe, res, out_path, allow_pickle, overwrite, run_eval)
    measure_groups(recipe, spec, ckpt, groups)
    choice = choose_types(groups, free)
    if choice is None:  # only when rounding to units ate the last bytes
        raise RecipeError(f"fit: no allocation fits {budget:,} bytes; valid: a budget above {fixed + meta + least:,} bytes")
    res.choice, res.predicted_kl = choice
    if dry_run:
        return res
    return _write_and_run(recipe, res, out_path, allow_pickle, overwrite, run_eval)


def measure_groups(recipe, spec: FitSpec, ckpt, groups: list[Group], progress: bool = True) -> list:
    """Weight errors of every candidate type, and the streamed probes of every unpinned group;
    returns the probe texts ((1, T) token ids)."""
    import time

    from quantize.fit import measure

    log.info("fit: %d groups; measuring weight errors at %d types", len(groups), len(candidate_types()))
    t0 = time.perf_counter()
    measure.measure_errors(groups, ckpt)
    texts = probe_texts(recipe, ckpt.folder, spec.samples)
    positions, probed = sum(int(t.numel()) for t in texts), sum(g.pinned is None for g in groups)
    measure.check_prober_memory(ckpt, positions, n_groups=probed, probes=spec.probes)
    t1 = time.perf_counter()
    log.info("fit: probing %d groups at %s on %d tokens (%s probes), streaming the checkpoint",
             probed, spec.probe, positions, spec.probes)
    measure.measure_sensitivity(groups, ckpt, texts, spec.probe, progress, spec.probes, recipe.seed)
    log.info("fit: measured in %.0f s (weight errors %.0f s, probes %.0f s)", time.perf_counter() - t0, t1 - t0,
             time.perf_counter() - t1)
    return texts


def choose_types(groups: list[Group], free: int) -> tuple[dict[str, str], float] | None:
    """The least predicted KL within ``free`` bytes: ({GGUF name: type}, predicted KL), or None."""
    from quantize.fit import optimise

    least = sum(g.bytes[g.types[0]] for g in groups)
    costs = [[g.bytes[t] for t in g.types] for g in groups]
    values = [[g.predicted(t) if g.pinned is None else 0.0 for t in g.types] for g in groups]
    picks = optimise.allocate(costs, values, free, optimise.unit_for(max(free - least, 1)))
    if picks is None:
        return None
    choice = {g.name: g.types[j] for g, j in zip(groups, picks)}
    return choice, sum(g.predicted(choice[g.name]) for g in groups if g.pinned is None)


def _write_and_run(recipe, res: FitResult, out_path: Path, allow_pickle: bool, overwrite: bool, run_eval: bool) -> FitResult:
    from quantize.pipeline import run
    from quantize.recipe import load_recipe

    write_recipe(out_path, plain_recipe(recipe, res))
    try:
        fitted = load_recipe(out_path)
        if not run_eval:
            fitted = fitted.model_copy(update={"eval": None})
        res.run = run(fitted, allow_pickle=allow_pickle, overwrite=overwrite)
    except BaseException:
        out_path.unlink(missing_ok=True)  # ours (check_recipe_path): no recipe without its GGUF
        raise
    res.recipe_path = out_path
    return res


def recipe_path(recipe) -> Path:
    out = Path(recipe.output)
    return out.with_name(out.name + ".fit.yaml")


def check_recipe_path(path: Path) -> None:
    """Replace only a recipe an earlier fit wrote; anything else at that path is the user's."""
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file() or not path.read_text(errors="replace").startswith(HEADER):
            raise RecipeError(f"fit: {path} exists and was not written by fit; move it or choose another output (--out)")


def plain_recipe(recipe, res: FitResult) -> dict:
    data = base_data(recipe)
    by_type: dict[str, list[str]] = {}
    for g in res.groups:
        by_type.setdefault(res.choice[g.name], []).append(g.name)
    gguf = data["exports"]["gguf"]
    gguf["tensor_types"] = [{"match": names, "type": t} for t, names in sorted(by_type.items())]
    basis = (f"device {res.spec.device}, context {res.spec.context}, vision {res.spec.vision}" if res.spec.device
             else f"budget {res.spec.budget}")
    gguf["fitted"] = {"budget_bytes": res.budget_bytes, "predicted_kl": None if res.predicted_kl is None else float(f"{res.predicted_kl:.6g}"),
                      "basis": f"{basis}; {res.spec.probes} probes at {res.spec.probe} on {res.spec.samples} calibration samples"}
    if "eval" not in data:
        data["eval"] = {"perplexity": False, "kl": True}  # the measured KL, beside the predicted one
    return data


def write_recipe(path: Path, data: dict) -> None:
    from eval.atomic_file import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, HEADER + yaml.safe_dump(data, sort_keys=False, width=120))


def measured_kl(run_result, gguf: Path) -> float | None:
    """The mean KL the run's own evaluation measured for ``gguf`` (None without one)."""
    import json

    rel = ((run_result.eval or {}).get("results") or {}).get(gguf.name)
    if rel is None:
        return None
    q = json.loads((run_result.out_dir / rel).read_text()).get("quality") or {}
    return (q.get("kl") or {}).get("mean")


def kl_text(res: FitResult) -> str:
    return "not measured (every group at its largest type)" if res.predicted_kl is None else f"{res.predicted_kl:.4g}"


def bits(g: Group, t: str) -> float:
    return 8 * g.bytes[t] / g.weights


def describe(res: FitResult) -> str:
    """The dry run's text: budget breakdown, then the chosen type and bits per group."""
    lines = list(res.breakdown.lines()) if res.breakdown else [f"budget {res.spec.budget}: {res.budget_bytes:,} bytes for the text GGUF"]
    lines += [f"  fixed (norms, AltUp, LAuReL, per-layer model projection, KV placeholders): {res.fixed_bytes:,} bytes",
              f"  metadata allowance (vocabulary, tensor index): {res.metadata_bytes:,} bytes",
              f"  groups: {res.chosen_bytes:,} of {res.budget_bytes - res.fixed_bytes - res.metadata_bytes:,} bytes "
              f"({8 * res.chosen_bytes / sum(g.weights for g in res.groups):.3f} bits per weight); predicted KL {kl_text(res)}",
              f"{'group':<32} {'type':<5} {'bpw':>6} {'bytes':>12} {'sensitivity':>12} {'pred. KL':>10}"]
    for g in res.groups:
        t = res.choice[g.name]
        pk = "pinned" if g.pinned else "-" if res.predicted_kl is None else f"{g.predicted(t):.3e}"
        sens = "-" if g.pinned or res.predicted_kl is None else f"{g.sensitivity:.4g}"
        lines.append(f"{g.name:<32} {t:<5} {bits(g, t):>6.3f} {g.bytes[t]:>12,} {sens:>12} {pk:>10}")
    return "\n".join(lines)
