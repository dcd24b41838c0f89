"""What a sweep task does on its node, as plain functions (Ray only calls them): predict a
variant's sizes, build it on the worker's disk, build the KL base of a model, evaluate a GGUF
with llama.cpp. The sweep is where ``quantize`` and ``eval`` meet (``eval`` never imports us)."""
from __future__ import annotations

import json
from pathlib import Path

from quantize.recipe import Recipe
from quantize.sweep.files import pack, worker_tempdir


def predict(recipe: Recipe) -> tuple[int, int, bool]:
    """The dry run's numbers (no weight is read): predicted artifact bytes (safetensors folder
    plus the text GGUF's tensor data), the checkpoint's bytes, and whether the run calibrates."""
    from quantize import pipeline

    ckpt, plan = pipeline.prepare(recipe)
    artifact = 0
    st = recipe.exports.safetensors
    if st is not None and st.enabled:
        from quantize.formats.safetensors.writer import predicted_bytes

        artifact += predicted_bytes(plan, st, ckpt.folder)
    gguf = recipe.exports.gguf
    if gguf is not None and gguf.enabled:
        artifact += sum(t.nbytes for t in pipeline.gguf_text_plan(recipe, ckpt.folder, plan).targets)
    checkpoint = sum(f.stat().st_size for f in ckpt.files)
    return artifact, checkpoint, pipeline.needs_calibration(plan) or recipe.kv_cache.fp8


def build_variant(recipe_json: dict) -> dict[str, bytes]:
    """Run the recipe into a scratch folder on this node; its files by relative path. The recipe
    still names the sweep's output, so manifest and GGUF metadata equal a plain run's."""
    from quantize import pipeline

    recipe = Recipe.model_validate(recipe_json)
    with worker_tempdir() as tmp:
        pipeline.run(recipe, into=tmp / "out", progress=False)
        return pack(tmp / "out")


def reference_base(model: str, seq_len: int, n_windows: int):
    """The KL base (the unquantized model's top-k log-probs on the held-out windows), computed
    once per model with transformers and shipped to every device."""
    from eval.run import RunSettings, build_kl_base
    from quantize.model import resolve_model

    folder = resolve_model(model)
    return build_kl_base(folder, RunSettings(seq_len=seq_len, n_windows=n_windows, device="cpu"))


def evaluate_gguf(name: str, filename: str, data, base, device: str, threads: int | None,
                  latency: bool, extra: dict) -> dict:
    """Evaluate one GGUF (``data``: its bytes, or a uint8 array) with llama.cpp on this node
    (tegrastats / nvpmodel recorded where the node has them); the results document, as ``eval``
    writes it."""
    from eval.run import RunSettings, evaluate

    settings = RunSettings(seq_len=int(base.tokens.shape[1]), n_windows=int(base.tokens.shape[0]), device=device,
                           threads=threads, latency=latency, extra=extra)
    with worker_tempdir() as tmp:
        artifact = tmp / Path(filename).name
        artifact.write_bytes(data)
        # The reference is only named in the results: its log-probs come with the base. The
        # results record the driver's path of the GGUF: the scratch path means nothing elsewhere.
        path = evaluate(artifact, base.meta["reference"], tmp / "results", "llamacpp", settings, base, name,
                        recorded_path=filename)
        return json.loads(Path(path).read_text())
