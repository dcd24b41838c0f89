"""Quality per bit and runtime speed of our GGUF exports against llama.cpp's own quantizer.

    python bench/compare_llamacpp.py                        # bench/bench_models.py's tiny model, 1 thread
    python bench/compare_llamacpp.py --bench-model wide     # its decoder-dominated variant
    python bench/compare_llamacpp.py --model FOLDER --threads 2 --out bench/results

One run, one harness:

1. Our pipeline writes the F32 GGUF (the KL reference) and an F16 GGUF (what llama.cpp's
   quantizer is fed, as after ``convert_hf_to_gguf.py --outtype f16``).
2. llama.cpp quantizes that F16 file to Q8_0, Q4_0 and Q4_K_M, plain (``llama_model_quantize``)
   and with an importance matrix from ``llama-imatrix`` on exactly the calibration text our
   pipeline uses (the recipe's embedded ``calib`` split, decoded to a text file).
3. Our pipeline writes Q8_0 (int8 g32: GPTQ decoder, least-squares scales for the tables), Q4_0
   (int4 g32 GPTQ, and importance-weighted RTN) and a Q4_K_M mix. In these same-type files the
   token and per-layer embedding tables get the GGUF types llama.cpp chose in its file of the
   same type, so the block weights are what differs. Then ``ours-int4-mix``: recipes/int4.yaml's
   bit allocation (int4 GPTQ decoder and per-layer projections as Q4_0, token embedding Q8_0,
   per-layer table Q5_K), compared on size and KL with every llama.cpp file and on speed with
   llama.cpp's Q4_0.
4. Every file is evaluated by eval's llama.cpp backend on the same held-out windows: size, bits
   per weight, perplexity, mean KL against the F32 file, top-1 agreement; then prompt (pp) and
   generation (tg) tokens/s, medians over rounds that interleave the files (a shared machine's
   load drifts over minutes, interleaving spreads it evenly).
5. Results go to ``--out`` as ``compare_llamacpp.json`` and ``compare_llamacpp.md`` (``-wide``
   for ``--bench-model wide``, bench/bench_models.py's decoder-dominated model); the ratio
   table (ours / llama.cpp) and every missed target ("WORSE") are printed.

Needs llama-cpp-python; the imatrix rows need ``bench/build_llamacpp_tools.sh`` run once (rows
are skipped, with a message, where the tools are missing). Runs offline.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_models import BENCH_MODELS, bench_model, results_suffix  # noqa: E402

log = logging.getLogger("bench.compare_llamacpp")

TOWERS_KEEP = {k: "keep" for k in ("text", "token_embeddings", "per_layer_embeddings", "per_layer_projections",
                                   "altup_laurel", "vision", "audio", "embedders")}
EMBEDDINGS = ("token_embd.weight", "per_layer_token_embd.weight")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model folder (default: --bench-model)")
    p.add_argument("--bench-model", default="tiny", choices=list(BENCH_MODELS),
                   help="bench/bench_models.py's model (wide: E4B's decoder share); results of any but tiny get a -NAME suffix")
    p.add_argument("--threads", type=int, default=1, help="threads for llama.cpp, torch and the tools (default 1)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-compare"), help="GGUF files and logs")
    p.add_argument("--tools", default=str(ROOT / ".cache" / "llama.cpp-tools" / "tools.json"))
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--n-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=11, help="interleaved latency rounds (median)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--reuse", action="store_true", help="reuse GGUF files already in --work")
    return p.parse_args(argv)


class Timer:
    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()
                log.info("== %s", name)

            def __exit__(self, *exc):
                timer.stages[name] = round(time.perf_counter() - self.t, 2)
                log.info("   %s: %.1f s", name, timer.stages[name])

        return _T()


# ----------------------------------------------------------------------------- our files


def our_recipe(name, model, work, towers, mix, calib, gguf_types=None):
    from quantize.recipe import parse_recipe

    g = {"mix": mix, "mmproj": False}
    if gguf_types:
        g.update(gguf_types)
    return parse_recipe({
        "name": name, "model": str(model), "output": str(work / name), "seed": 0,
        "calibration": calib, "towers": {**TOWERS_KEEP, **towers}, "exports": {"gguf": g},
        "ignore": ["*per_layer_model_projection*"],
    })


def run_ours(recipe, reuse: bool) -> Path:
    from quantize.pipeline import run

    out = Path(recipe.output)
    found = sorted(out.glob("*.gguf")) if out.exists() else []
    if reuse and found:
        return found[0]
    result = run(recipe, progress=False)
    return next(p for p in result.artifacts if p.suffix == ".gguf")


def calibration_config(args) -> dict:
    return {"text": {"source": "embedded", "n_samples": args.calib_samples, "seq_len": args.calib_seq_len},
            "images": {"n_samples": 0}, "audio": {"n_samples": 0}}


def write_calibration_text(model: Path, calib: dict, path: Path) -> dict:
    """The exact text samples our pipeline calibrates on, decoded, one sample per paragraph."""
    from transformers import AutoTokenizer

    from calibrate import build_calibration
    from calibrate.config import CalibrationConfig

    tok = AutoTokenizer.from_pretrained(str(model))
    cs = build_calibration(CalibrationConfig.model_validate(calib), tok, seed=0)
    texts = [tok.decode(ids[0].tolist()[1:], skip_special_tokens=False) for ids in cs.text]
    path.write_text("\n\n".join(texts))
    return {"samples": len(texts), "tokens": int(sum(t.shape[-1] for t in cs.text)), "path": str(path)}


# ----------------------------------------------------------------------------- GGUF facts


def gguf_facts(path: Path) -> dict:
    """Parameter count, per-type weight counts and the embedding tables' types of one GGUF."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    n, by_type, emb = 0, {}, {}
    for t in r.tensors:
        ne = int(t.n_elements)
        n += ne
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + ne
        if t.name in EMBEDDINGS:
            emb[t.name] = t.tensor_type.name
    return {"n_params": n, "weights_by_type": by_type, "embeddings": emb}


# ----------------------------------------------------------------------------- evaluation


def kl_base_from_gguf(f32: Path, model: Path, settings, threads: int):
    """eval's KL base, but with the F32 *GGUF* in llama.cpp as the reference distribution."""
    import numpy as np

    from eval import kl as klmod
    from eval.backends.llamacpp import LlamaCppBackend
    from eval.run import tokenize_heldout
    from eval.windows import scored_logits

    windows = tokenize_heldout(model, settings)
    be = LlamaCppBackend(f32, threads=threads, n_ctx=settings.seq_len)
    ids_all, lp_all, rest_all = [], [], []
    try:
        vocab = be.vocab_size
        for w in windows.tokens:
            lp = klmod.log_softmax(scored_logits(be.logits(w), windows), vocab)
            ids, vals = klmod.topk_rows(lp, settings.kl_top_k)
            ids_all.append(ids)
            lp_all.append(vals)
            rest_all.append(klmod.rest_logmass(lp, ids))
    finally:
        be.close()
    return klmod.KLBase(tokens=windows.tokens, first=windows.first, vocab=vocab, top_ids=np.concatenate(ids_all),
                        top_logp=np.concatenate(lp_all), rest_logp=np.concatenate(rest_all),
                        meta={"reference": str(f32), "seq_len": settings.seq_len, "n_windows": windows.n_windows})


def quality_of(path: Path, base, threads: int, seq_len: int) -> dict:
    from eval.backends.llamacpp import LlamaCppBackend
    from eval.run import quality

    be = LlamaCppBackend(path, threads=threads, n_ctx=seq_len)
    try:
        return quality(be, base)
    finally:
        be.close()


def speed_rounds(files: dict[str, Path], base, threads: int, prompt: int, gen: int, rounds: int) -> dict:
    """Median prompt and generation tokens/s per file over ``rounds`` interleaved rounds."""
    from eval.backends.llamacpp import LlamaCppBackend
    from eval.latency import measure

    stream = base.tokens[:, 1:].reshape(-1)
    bos = int(base.tokens[0, 0])
    pp = {k: [] for k in files}
    tg = {k: [] for k in files}
    for r in range(rounds):
        order = list(files) if r % 2 == 0 else list(reversed(files))  # no file always goes first
        for name in order:
            be = LlamaCppBackend(files[name], threads=threads, n_ctx=prompt + gen + 1)
            try:
                m = measure(be, stream, bos, (prompt,), gen, repeats=1, warmup=1)["runs"][0]
            finally:
                be.close()
            pp[name].append(m["prefill_tok_s"])
            tg[name].append(m["decode_tok_s"])
        log.info("speed round %d/%d done", r + 1, rounds)
    return {k: {"pp_tok_s": statistics.median(pp[k]), "tg_tok_s": statistics.median(tg[k]),
                "pp_all": pp[k], "tg_all": tg[k]} for k in files}


# ----------------------------------------------------------------------------- main


def quiet_bench_process(threads: int, quiet=("httpx", "urllib3", "transformers", "quantize", "calibrate", "eval")) -> None:
    """The benchmarks' process setup: ``threads`` for torch and OpenMP, no progress bars, our
    own timing lines on INFO and the libraries' logs on WARNING."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in quiet:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(threads)


def main(argv=None) -> int:
    from bench.results_file import write_results

    args = parse_args(argv)
    quiet_bench_process(args.threads)
    from bench import compare_table as table
    from bench import llamacpp_tools as lt

    t_start = time.perf_counter()
    timer = Timer()
    if args.model:
        model = Path(args.model)
    else:
        with timer(f"bench model {args.bench_model} (cached)"):
            model = bench_model(args.bench_model)
    work = Path(args.work) / model.name
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("model %s, threads %d (llama.cpp, torch, tools; OMP_NUM_THREADS=%s)", model, args.threads,
             os.environ.get("OMP_NUM_THREADS"))
    tools = lt.find_tools(args.tools)
    calib = calibration_config(args)
    notes: list[str] = []

    with timer("ours: F32 and F16 GGUF"):
        f32 = run_ours(our_recipe("reference-f32", model, work, {}, "F32", calib), args.reuse)
        f16 = run_ours(our_recipe("reference-f16", model, work, {}, "F16", calib), args.reuse)
    facts = {"F32": gguf_facts(f32)}
    n_params = facts["F32"]["n_params"]

    files: dict[str, dict] = {}  # name -> {path, side, type, imatrix}
    with timer("llama.cpp: plain quantization"):
        for qt in ("Q8_0", "Q4_0", "Q4_K_M"):
            dst = work / f"llamacpp-{qt}.gguf"
            if not (args.reuse and dst.exists()):
                lt.quantize_plain(f16, dst, qt, args.threads)
            files[f"llama.cpp {qt}"] = {"path": dst, "side": "llama.cpp", "type": qt, "imatrix": False}
    imatrix_info = None
    if tools.has("llama-imatrix") and tools.has("llama-quantize"):
        with timer("llama.cpp: llama-imatrix on our calibration text"):
            text = work / "calibration.txt"
            imatrix_info = write_calibration_text(model, calib, text)
            imat = work / "imatrix.gguf"
            if not (args.reuse and imat.exists()):
                lt.compute_imatrix(tools, f16, text, imat, args.threads, args.calib_seq_len, work / "imatrix.log")
        with timer("llama.cpp: quantization with imatrix"):
            for qt in ("Q8_0", "Q4_0", "Q4_K_M"):
                dst = work / f"llamacpp-{qt}-imatrix.gguf"
                if not (args.reuse and dst.exists()):
                    lt.quantize_with_imatrix(tools, f16, dst, qt, imat, args.threads, work / f"quantize-{qt}.log")
                files[f"llama.cpp {qt} imatrix"] = {"path": dst, "side": "llama.cpp", "type": qt, "imatrix": True}
    else:
        notes.append("llama-imatrix / llama-quantize are not built (bench/build_llamacpp_tools.sh): the imatrix rows "
                     "are missing, and the targets are judged against llama.cpp's plain files instead.")
        log.warning(notes[-1])

    def emb_types(qt):
        e = gguf_facts(files[f"llama.cpp {qt}"]["path"])["embeddings"]
        return {"token_embeddings": e.get("token_embd.weight"), "per_layer_embeddings": e.get("per_layer_token_embd.weight")}

    # llama.cpp also quantizes the per-layer input gate and projection (inp_gate, proj) and
    # keeps per_layer_model_proj in F16: ours do the same (RTN there: the sequential
    # calibration covers the attention and MLP linears). Same-type files give their embedding
    # tables the GGUF types llama.cpp chose, so the block weights are what differs.
    int8_searched = {"preset": "int8", "importance": True}  # MSE-optimal Q8_0 scales (see quantize.methods.dispatch)
    ours_specs = [
        ("ours-Q8_0", "Q8_0", {"text": {"type": "int8", "method": "gptq"}, "per_layer_projections": "int8",
                               "token_embeddings": int8_searched, "per_layer_embeddings": int8_searched}, "auto"),
        ("ours-Q4_0-gptq", "Q4_0", {"text": "int4_gptq", "per_layer_projections": "int4"}, "auto"),
        ("ours-Q4_0-imatrix", "Q4_0", {"text": "int4_imatrix", "per_layer_projections": "int4"}, "auto"),
        ("ours-Q4_K_M", "Q4_K_M", {"text": "int4_imatrix", "per_layer_projections": "int4"}, "Q4_K_M"),
    ]
    # Our bit allocation (recipes/int4.yaml's GGUF): the decoder stays int4 GPTQ (Q4_0 blocks),
    # the per-layer input gate/projection Q4_0 as in llama.cpp's Q4_0; the tied token embedding
    # -- which is also the output layer -- gets Q8_0, and the 262144 x 35*256 per-layer table, a
    # lookup that llama.cpp stores as Q6_K because it shares the token embedding's name rule,
    # gets Q5_K. (Q8_0 per-layer projections lowered the KL a little more but cost ~4% of the
    # tiny model's generation speed, where they are a fifth of the decoder's weights.)
    mix_towers = {"text": "int4_gptq", "per_layer_projections": "int4", "token_embeddings": "int8"}
    mix_types = {"tensor_types": [{"match": ["per_layer_token_embd.weight"], "type": "Q5_K"}]}
    for name, qt, towers, mix in ours_specs:
        with timer(f"ours: {name}"):
            path = run_ours(our_recipe(name, model, work, towers, mix, calib, emb_types(qt)), args.reuse)
        files[name] = {"path": path, "side": "ours", "type": qt, "imatrix": None, "recipe_towers": towers, "mix": mix}
    with timer("ours: ours-int4-mix"):
        path = run_ours(our_recipe("ours-int4-mix", model, work, mix_towers, "auto", calib, mix_types), args.reuse)
    # a mix of types: its speed is compared with llama.cpp's Q4_0, whose place it takes
    files["ours-int4-mix"] = {"path": path, "side": "ours", "type": "mix", "pair_type": "Q4_0", "imatrix": None,
                              "recipe_towers": mix_towers, "mix": "auto", "gguf": mix_types}

    from eval.run import RunSettings

    settings = RunSettings(seq_len=args.seq_len, n_windows=args.n_windows, threads=args.threads)
    with timer("KL base from the F32 GGUF"):
        base = kl_base_from_gguf(f32, model, settings, args.threads)
    rows = []
    with timer("quality of every file"):
        for name, f in [("F32 (reference)", {"path": f32, "side": "reference", "type": "F32", "imatrix": None}),
                        *files.items()]:
            q = quality_of(f["path"], base, args.threads, args.seq_len)
            size = f["path"].stat().st_size
            rows.append({"name": name, "side": f["side"], "type": f["type"], "imatrix": f["imatrix"],
                         **({"pair_type": f["pair_type"]} if "pair_type" in f else {}),
                         "path": str(f["path"]), "size_bytes": size, "bpw": size * 8 / n_params,
                         "ppl": q["ppl"], "ppl_stderr": q["ppl_stderr"], "kl_mean": q["kl"]["mean"],
                         "kl_p99": q["kl"]["p99"], "top1": q["kl"]["top1"], "kl_windows": q["kl"]["window_means"],
                         "weights_by_type": gguf_facts(f["path"])["weights_by_type"]})
            log.info("%-24s %7.2f MiB  ppl %.4f  KL %.5f  top-1 %.3f", name, size / 2**20, q["ppl"], q["kl"]["mean"], q["kl"]["top1"])
    if not args.no_speed:
        with timer("speed (interleaved rounds)"):
            sp = speed_rounds({r["name"]: Path(r["path"]) for r in rows if r["side"] != "reference"}, base,
                              args.threads, args.prompt_tokens, args.gen_tokens, args.rounds)
        for r in rows:
            if r["name"] in sp:
                r.update(sp[r["name"]])

    verdicts = table.quality_verdicts(rows)
    pairs = table.pair_rows(rows)
    misses = table.plain_summary(verdicts, pairs)
    noise = table.speed_noise(rows)
    total = time.perf_counter() - t_start
    import llama_cpp
    import torch

    env = {"threads": args.threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cpu_count": os.cpu_count(),
           "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
           "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
           "load_average_at_end": os.getloadavg()}
    cmd = "python bench/compare_llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"# Ours vs llama.cpp's quantizer\n\nModel: `{model.name}` ({n_params / 1e6:.1f}M parameters in the GGUF), "
              f"{base.tokens.shape[0]} held-out windows of {base.tokens.shape[1]} tokens (second halves scored), "
              f"KL against the F32 GGUF in llama.cpp, {args.threads} thread(s), speed: {args.prompt_tokens}-token prompt "
              f"and {args.gen_tokens} generated tokens, medians of {args.rounds} interleaved rounds. "
              f"Calibration (ours and llama-imatrix): {args.calib_samples} x {args.calib_seq_len} tokens of the embedded "
              f"calib split. Made by `{cmd.strip()}` in {total / 60:.1f} min on {env['cpu_count']} cores "
              f"(load average at the end {env['load_average_at_end'][0]:.1f}), "
              f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}.\n")
    md = table.markdown(rows, verdicts, pairs, header)
    md += "\n" + ("\n".join(f"- {m}" for m in misses) if misses else "- All targets met.") + "\n"
    if notes:
        md += "\nNotes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    md += "\nStage times (s): " + ", ".join(f"{k} {v}" for k, v in timer.stages.items()) + "\n"
    result = {"command": cmd.strip(), "model": str(model), "n_params": n_params, "env": env, "rows": rows,
              "pairs": pairs, "verdicts": verdicts, "speed_noise": noise, "misses": misses, "notes": notes, "imatrix_text": imatrix_info,
              "stages_s": timer.stages, "total_s": round(total, 1),
              "settings": {k: getattr(args, k) for k in ("calib_samples", "calib_seq_len", "n_windows", "seq_len",
                                                         "prompt_tokens", "gen_tokens", "rounds")},
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    stem = "compare_llamacpp" + results_suffix(args.bench_model, bool(args.model))
    write_results(out, stem, result, md)
    print(md)
    print(f"wrote {out / stem}.json and .md ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
