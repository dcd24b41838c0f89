"""The benchmarks' two models, and the check that they are trained enough to tell GGUF types apart.

    python bench/bench_models.py                 # build (once, cached) and check both
    python bench/bench_models.py --models wide

- ``tiny``: the tiny Gemma 3n (quantize/tiny.py's shapes: hidden 256, FFN 512, the per-layer
  table 55% of the text weights), trained 1500 steps instead of the test fixture's 240.
- ``tiny256``: ``tiny`` trained on 256-token windows instead of 64 (about 60 min on one core).
- ``tiny512``: ``tiny`` trained on the evaluation's own window length, 2 x 512 tokens per step
  (the same tokens per step as ``tiny256``; the benches score positions 256-511 of 512-token
  windows, which the shorter-window models never saw in training). It tells the two types
  apart less than ``tiny256`` (bench/results/bench_models.md): kept as that measurement.
- ``tiny256-lr1e-2``: ``tiny256`` at twice the peak learning rate (5e-3 -> 1e-2): also less.
- ``tiny256-3000``: ``tiny256`` trained twice as long (about 126 min on one core): held-out
  perplexity 54 and more KL in both mixes, but a lower ratio (the output layer's KL grew too).
- ``wide256``: ``wide`` on ``tiny256``'s windows (about 118 min): above ``wide``, below 1.5.
- ``wide``: ``tiny`` with E4B's FFN ratio (FFN 2048 = 8 x hidden), so that, as in E4B, the
  decoder layers hold most of the text weights (62%; E4B 56%) and the per-layer table about a
  third (34%; E4B 34%). On the tiny model the tied output layer dominates the KL and hides the
  decoder; here the decoder has the weight it has in E4B.

Both are ``quantize.tiny.cached_tiny("trained", ...)`` builds (deterministic, content-hashed,
cached under ~/.cache/gemma3n-quantize). A model undertrained on the embedded corpus gives
llama.cpp's Q4_0 and Q4_K_M the same KL (the test fixture: 0.96x), where real models differ by
2x or more (Llama-3-8B: 0.0719 vs 0.0313, llama.cpp PR #6936). The check: llama.cpp's plain
Q4_0 and Q4_K_M of each model, mean KL against its F32 GGUF on held-out text, in llama.cpp;
the target is Q4_0 / Q4_K_M >= 1.5, with the ratio's paired 95% bootstrap interval over the
windows (``eval.kl.paired_ratio``; 32 windows of 512 tokens by default: at 8 the interval of
tiny256's 1.39 was 1.13-1.71, too wide to tell it from the target). Also reported: the same with
both embedding tables kept in F16 (the decoder's own share) and the weight shares. Results:
``--out``/bench_models.{json,md}; each run replaces its models' rows and keeps the others.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> quantize.tiny.TinySpec overrides (flavour "trained")
BENCH_MODELS = {
    "tiny": {"train_steps": 1500},
    "wide": {"intermediate_size": 2048, "train_steps": 1500},
    # tiny's shapes on 256-token windows (4 x 64 above): the same steps see 4x the tokens and
    # longer contexts, so the decoder does more of the work (held-out ppl 104 instead of 256).
    "tiny256": {"train_steps": 1500, "train_seq_len": 256},
    # The evaluation's length: the benches score positions 256-511 of 512-token windows, which
    # a model trained on shorter windows never saw. Same tokens per step as tiny256 (2 x 512).
    "tiny512": {"train_steps": 1500, "train_seq_len": 512, "train_batch": 2},
    # tiny256 at twice the peak learning rate: rougher weights tell Q4_0 from Q4_K_M better?
    "tiny256-lr1e-2": {"train_steps": 1500, "train_seq_len": 256, "train_lr": 1e-2},
    # tiny256 trained twice as long (about 4 passes over the train split): is it trained enough?
    "tiny256-3000": {"train_steps": 3000, "train_seq_len": 256},
    # wide on tiny256's windows, the setup that told the types apart best on tiny's shapes.
    "wide256": {"intermediate_size": 2048, "train_steps": 1500, "train_seq_len": 256},
}
TARGET_RATIO = 1.5


def bench_model(name: str) -> Path:
    """The folder of a bench model, built on first use (on one core: tiny ~20 min, wide ~35 min,
    tiny256, tiny512 and tiny256-lr1e-2 ~65 min,
    wide256 ~120 min, tiny256-3000 ~126 min)."""
    from quantize.tiny import cached_tiny

    if name not in BENCH_MODELS:
        raise SystemExit(f"unknown bench model {name!r}; valid: {', '.join(BENCH_MODELS)}")
    return cached_tiny("trained", **BENCH_MODELS[name])


def results_suffix(name: str, given_model: bool = False) -> str:
    """The suffix of a bench's result files for bench model ``name``: none for ``tiny`` or a
    ``--model`` folder, else ``-name`` (compare_llamacpp-wide.md)."""
    return "" if given_model or name == "tiny" else f"-{name}"


def weight_shares(model: Path) -> dict:
    """Shares of the text weights: decoder layers, per-layer table, token embedding, the rest."""
    from safetensors import safe_open

    n = {"decoder_layers": 0, "per_layer_table": 0, "token_embedding": 0, "other": 0}
    dead = set()
    cfg = json.loads((model / "config.json").read_text())["text_config"]
    first_shared = cfg["num_hidden_layers"] - cfg["num_kv_shared_layers"]
    for i in range(first_shared, cfg["num_hidden_layers"]):  # dead K/V of KV consumers: no weights of the model
        dead |= {f"model.language_model.layers.{i}.self_attn.{p}.weight" for p in ("k_proj", "v_proj", "k_norm")}
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if not k.startswith("model.language_model.") or k in dead:
                continue
            size = 1
            for d in f.get_slice(k).get_shape():
                size *= d
            kind = ("per_layer_table" if "embed_tokens_per_layer" in k else "token_embedding" if "embed_tokens" in k
                    else "decoder_layers" if ".layers." in k else "other")
            n[kind] += size
    total = sum(n.values())
    return {"weights": total, **{k: round(v / total, 3) for k, v in n.items()}}


def _interval(r: dict, key: str = "ratio_ci") -> str:
    ci = r.get(key)
    return "" if ci is None else f" ({ci['lo']:.2f}-{ci['hi']:.2f})"


def verdict(r: dict) -> str:
    """met / MISSED, and "not resolved" where the windows' interval holds the target."""
    from eval.kl import resolved

    v = "met" if r["ratio"] >= TARGET_RATIO else "MISSED"
    return v if resolved(r.get("ratio_ci"), TARGET_RATIO) else f"{v} (not resolved)"


def check(model: Path, work: Path, threads: int, seq_len: int, n_windows: int) -> dict:
    """llama.cpp's plain Q4_0 and Q4_K_M (and the same with F16 tables): mean KL vs the F32 GGUF."""
    from bench import llamacpp_tools as lt
    from bench.compare_llamacpp import calibration_config, kl_base_from_gguf, our_recipe, quality_of, run_ours
    from eval.kl import paired_ratio
    from eval.run import RunSettings

    work.mkdir(parents=True, exist_ok=True)
    calib = calibration_config(argparse.Namespace(calib_samples=4, calib_seq_len=128))  # unused: F32/F16 only
    f32 = run_ours(our_recipe("reference-f32", model, work, {}, "F32", calib), True)
    f16 = run_ours(our_recipe("reference-f16", model, work, {}, "F16", calib), True)
    base = kl_base_from_gguf(f32, model, RunSettings(seq_len=seq_len, n_windows=n_windows), threads)
    tools = lt.find_tools(ROOT / ".cache" / "llama.cpp-tools" / "tools.json")
    kl, windows, ppl = {}, {}, quality_of(f32, base, threads, seq_len)["ppl"]

    def score(name: str, gguf: Path) -> None:
        q = quality_of(gguf, base, threads, seq_len)["kl"]
        kl[name], windows[name] = q["mean"], q["window_means"]

    for qt in ("Q4_0", "Q4_K_M"):
        dst = work / f"llamacpp-{qt}.gguf"
        if not dst.exists():
            lt.quantize_plain(f16, dst, qt, threads)
        score(qt, dst)
        if tools.has("llama-quantize"):
            # --token-embedding-type also reaches per_layer_token_embd (its name holds
            # "token_embd"), so the per-layer table alone is the second variant and the tied
            # output layer's share is what the first adds to it.
            for tag, args in (("F16 tables", ["--token-embedding-type", "f16", "--tensor-type", "per_layer_token_embd=f16"]),
                              ("F16 per-layer table", ["--tensor-type", "per_layer_token_embd=f16"])):
                dst = work / f"llamacpp-{qt}-{tag.lower().replace(' ', '-')}.gguf"
                if not dst.exists():
                    lt.run_tool([tools.exe("llama-quantize"), "--allow-requantize", *args, f16, dst, qt, threads])
                score(f"{qt} ({tag})", dst)
    # The ratio's paired interval over the windows (the same windows for both files): is the
    # verdict told apart from the evaluation's own noise? (Training noise is not in it.)
    res = {"heldout_ppl": ppl, "kl_mean": kl, "kl_windows": windows, "ratio": kl["Q4_0"] / kl["Q4_K_M"],
           "ratio_ci": paired_ratio(windows["Q4_0"], windows["Q4_K_M"])}
    if "Q4_0 (F16 tables)" in kl:
        res["ratio_f16_tables"] = kl["Q4_0 (F16 tables)"] / kl["Q4_K_M (F16 tables)"]
        res["ratio_f16_tables_ci"] = paired_ratio(windows["Q4_0 (F16 tables)"], windows["Q4_K_M (F16 tables)"])
        # Q6_K in both mixes: the tied token embedding, read as the output layer
        res["output_layer_share_q4_k_m"] = (kl["Q4_K_M (F16 per-layer table)"] - kl["Q4_K_M (F16 tables)"]) / kl["Q4_K_M"]
    return res


def main(argv=None) -> int:
    from bench.compare_llamacpp import quiet_bench_process
    from bench.results_file import write_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(BENCH_MODELS), choices=list(BENCH_MODELS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-windows", type=int, default=32)
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-models"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    quiet_bench_process(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    jpath = out / "bench_models.json"
    new = {}
    for name in args.models:
        model = bench_model(name)
        r = {"name": name, "folder": model.name, "spec": BENCH_MODELS[name], **weight_shares(model),
             **check(model, Path(args.work) / model.name, args.threads, args.seq_len, args.n_windows)}
        new[name] = r
        print(f"{name}: Q4_0 / Q4_K_M KL {r['ratio']:.2f}{_interval(r)} (target >= {TARGET_RATIO})", flush=True)
    # Read the earlier rows only now: a run that trains a model for an hour must not drop the
    # rows another run wrote meanwhile.
    rows = {r["name"]: r for r in (json.loads(jpath.read_text())["rows"] if jpath.exists() else [])}
    rows.update(new)
    cmd = "python bench/bench_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# The bench models: weight shares and whether llama.cpp's Q4_0 and Q4_K_M differ on them", "",
        f"`{cmd.strip()}` (last run), {args.n_windows} held-out windows of {args.seq_len} tokens, mean KL against "
        f"the F32 GGUF in llama.cpp, plain llama.cpp quantization (no imatrix), {args.threads} thread(s), "
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {(time.perf_counter() - t0) / 60:.1f} min. \"F16 tables\": the "
        "same types with the token embedding (also the output layer) and the per-layer table kept in F16, i.e. "
        "the decoder's own share of the KL. \"Output layer's share\": what keeping only the per-layer table in F16 "
        "leaves over keeping both, as a share of the Q4_K_M file's KL: the tied token embedding is the output layer and "
        "is Q6_K in both mixes, so where it carries most of the KL the two mixes cannot differ by much on the whole "
        "file. E4B for comparison: decoder layers 56%, per-layer table 34%, token "
        "embedding 8% of the text weights.", "",
        "| model | spec | held-out ppl | text weights | decoder layers | per-layer table | token embedding | KL Q4_0 | KL Q4_K_M | "
        "Q4_0 / Q4_K_M (paired 95% interval over the windows) | target (>= 1.5) | same, F16 tables | output layer's share of the Q4_K_M KL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows.values():
        kl = r["kl_mean"]
        lines.append(f"| {r['name']} | `{json.dumps(r['spec'])}` | {r['heldout_ppl']:.1f} | {r['weights'] / 1e6:.1f}M | {r['decoder_layers']:.0%} | "
                     f"{r['per_layer_table']:.0%} | {r['token_embedding']:.0%} | {kl['Q4_0']:.3e} | {kl['Q4_K_M']:.3e} | "
                     f"{r['ratio']:.2f}{_interval(r)} | {verdict(r)} | "
                     f"{r.get('ratio_f16_tables', float('nan')):.2f}{_interval(r, 'ratio_f16_tables_ci')} | {r.get('output_layer_share_q4_k_m', float('nan')):.0%} |")
    write_results(out, "bench_models", {"command": cmd.strip(), "rows": list(rows.values())}, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
