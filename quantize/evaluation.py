"""The recipe's ``eval:`` section: the run measures what it wrote, through the ``eval`` package.

Before any weight is read, ``check_eval`` and ``check_eval_text`` refuse what would make the
evaluation fail (a missing text file, no llama.cpp runtime for the GGUF, too little text for the
windows). After the exports, ``run_eval`` evaluates the
source model (the baseline: its perplexity, KL 0) and each artifact (the safetensors folder with
transformers, the text GGUF with llama.cpp) against the source model, and writes the results,
the KL base and the report into ``eval/`` of the temporary output folder, so they appear with
the artifacts when the folder is renamed into place. Results record the artifacts' paths
relative to ``eval/`` (``../NAME.gguf``), so they stay true wherever the output folder goes.

A failing evaluation does not throw the artifacts away (a calibrated E4B run takes hours): the
partial ``eval/`` folder is removed, the manifest records the failure, the run completes, and
the command line reports it and exits with code 1. Interrupting the run (Ctrl-C) still leaves
nothing behind.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import shutil
from pathlib import Path

from quantize.errors import RecipeError
from quantize.recipe import Recipe

log = logging.getLogger(__name__)

EVAL_DIR = "eval"


def check_eval(recipe: Recipe) -> None:
    """Fail in the first second, not after quantizing, on what the evaluation cannot do."""
    ev = recipe.eval
    if ev is None:
        return
    from eval.latency import DEFAULT_PROMPT_LENGTHS

    # latency prompts are cut from the windows' text, so it must hold the longest prompt
    if ev.latency and ev.n_windows * (ev.seq_len - 1) < max(DEFAULT_PROMPT_LENGTHS):
        raise RecipeError(f"eval: latency times prompts of {max(DEFAULT_PROMPT_LENGTHS)} tokens, but n_windows x (seq_len - 1) "
                          f"= {ev.n_windows * (ev.seq_len - 1)} tokens of text; raise eval.n_windows or eval.seq_len")
    if ev.text.source == "files" and not glob.glob(ev.text.path):
        raise RecipeError(f"eval.text.path: {ev.text.path!r} does not exist (a file, folder or glob is expected)")
    gguf = recipe.exports.gguf
    if gguf is not None and gguf.enabled and importlib.util.find_spec("llama_cpp") is None:
        raise RecipeError("eval: the GGUF is evaluated with llama.cpp, and llama-cpp-python is not installed; "
                          "install it, or run with --no-eval")


def check_eval_text(recipe: Recipe, model_folder: Path) -> None:
    """The evaluation text holds n_windows x seq_len tokens of the model's tokenizer (seconds;
    refused before hours of calibration rather than after)."""
    if recipe.eval is None:
        return
    from eval.errors import EvalError
    from eval.run import tokenize_heldout

    try:
        tokenize_heldout(model_folder, _settings(recipe))
    except EvalError as e:
        raise RecipeError(f"eval: {e}") from None


def eval_targets(recipe: Recipe, out: Path, artifacts: list[Path]) -> list[Path]:
    """What is evaluated: the safetensors folder and the text GGUF (not the vision mmproj, which
    llama.cpp cannot evaluate alone)."""
    targets = []
    st = recipe.exports.safetensors
    if st is not None and st.enabled:
        from quantize.formats.safetensors.writer import artifact_dir

        targets.append(artifact_dir(out, st))
    targets += [p for p in artifacts if p.suffix == ".gguf" and not p.name.startswith("mmproj-")]
    return targets


def _settings(recipe: Recipe):
    from eval.heldout import TextSource
    from eval.run import RunSettings

    ev = recipe.eval
    t = ev.text
    text = TextSource(t.source, path=t.path, dataset=t.dataset, name=t.name, split=t.split, column=t.column)
    return RunSettings(seq_len=ev.seq_len, n_windows=ev.n_windows, device=recipe.device, perplexity=ev.perplexity,
                       kl=ev.kl, latency=ev.latency, towers=ev.towers, text=text)


def run_eval(recipe: Recipe, reference: Path, out: Path, artifacts: list[Path]) -> dict:
    """Evaluate into ``out/eval``; returns the manifest's ``eval`` record (paths relative to
    ``out``), or ``{"error": ...}`` when the evaluation failed."""
    from eval.errors import EvalError
    from eval.report import write_report
    from eval.results import load_result
    from eval.run import describe_result, evaluate_many
    from quantize.manifest import public_path

    folder = out / EVAL_DIR
    targets = eval_targets(recipe, out, artifacts)
    settings = _settings(recipe)
    # The source model is evaluated too when perplexity is asked: its perplexity is the baseline.
    items = ([reference] if recipe.eval.perplexity else []) + targets
    # Results record the artifacts relative to eval/ (the temporary folder is renamed afterwards,
    # and the output folder may move): ../NAME.gguf, ../safetensors.
    recorded = [None] * (len(items) - len(targets)) + [Path("..") / p.relative_to(out) for p in targets]
    spec = recipe.eval.model_dump(mode="json")
    spec["text"]["path"] = public_path(spec["text"]["path"])  # no local paths, as in the recipe record
    spec["text"]["dataset"] = public_path(spec["text"]["dataset"])
    try:
        paths = evaluate_many(items, reference, folder, "auto", settings, recorded_paths=recorded)
        baseline = "reference" if recipe.eval.perplexity else None
        md, page, flags = write_report(paths, folder, baseline)
    except Exception as e:  # eval failed after the artifacts were written: keep them, record why
        log.debug("evaluation failed", exc_info=True)
        shutil.rmtree(folder, ignore_errors=True)
        why = str(e) if isinstance(e, EvalError) else f"{type(e).__name__}: {e}"
        return {"spec": spec, "error": why.replace(str(out), str(recipe.output))}  # name the folder the user will see
    for f in flags:
        log.info("eval: %s", f)
    results = {}
    for item, p in zip(items, paths):
        key = "reference" if item == reference else str(item.relative_to(out))
        results[key] = str(p.relative_to(out))
        log.info("eval: %s", describe_result(load_result(p)))
    return {
        "spec": spec,
        "results": results,
        "report": [str(md.relative_to(out)), str(page.relative_to(out))],
        "files": sorted(str(p.relative_to(out)) for p in folder.rglob("*") if p.is_file()),
    }
