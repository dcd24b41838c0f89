"""Which tensors' quantization costs KL: one group of GGUF tensors at a time, the rest F32.

    python bench/sensitivity.py                       # tiny trained Gemma 3n, Q4_0 / Q4_K / Q5_K / Q6_K / Q8_0
    python bench/sensitivity.py --model FOLDER --types Q4_0 Q6_K

For each group (attention, MLP, per-layer input gate/projection, token embedding -- which is
also the tied output layer -- and the per-layer embedding table) and each GGUF type, our writer
produces a file where only that group is quantized (``tensor_types`` rules on an F32 mix,
without importance statistics), and llama.cpp evaluates it against the F32 file on held-out
text (the harness of ``compare_llamacpp.py``). The table is what recipes/int4.yaml's bit
allocation rests on. Results: ``--out``/sensitivity.json and .md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GROUPS = {
    "attention (q, k, v, o)": ["blk.*.attn_q.weight", "blk.*.attn_k.weight", "blk.*.attn_v.weight", "blk.*.attn_output.weight"],
    "MLP (gate, up, down)": ["blk.*.ffn_gate.weight", "blk.*.ffn_up.weight", "blk.*.ffn_down.weight"],
    "per-layer input gate, projection": ["blk.*.inp_gate.weight", "blk.*.proj.weight"],
    "token embedding (tied output)": ["token_embd.weight"],
    "per-layer embedding table": ["per_layer_token_embd.weight"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF model folder (default: the tiny trained Gemma 3n)")
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-sensitivity"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    from bench.results_file import write_results

    args = parse_args(argv)
    from bench.compare_llamacpp import quiet_bench_process

    quiet_bench_process(args.threads, ("httpx", "urllib3", "transformers", "quantize", "calibrate", "eval", "gguf"))
    from bench.compare_llamacpp import calibration_config, kl_base_from_gguf, our_recipe, quality_of, run_ours
    from eval.run import RunSettings

    t0 = time.perf_counter()
    if args.model:
        model = Path(args.model)
    else:
        from quantize.tiny import cached_tiny

        model = cached_tiny("trained")
    work = Path(args.work) / model.name
    work.mkdir(parents=True, exist_ok=True)
    calib = calibration_config(argparse.Namespace(calib_samples=1, calib_seq_len=16))  # unused: nothing calibrates
    f32 = run_ours(our_recipe("reference-f32", model, work, {}, "F32", calib), False)
    settings = RunSettings(seq_len=args.seq_len, n_windows=args.n_windows, threads=args.threads)
    base = kl_base_from_gguf(f32, model, settings, args.threads)
    rows = []
    for i, (group, patterns) in enumerate(GROUPS.items()):
        for qtype in args.types:
            name = f"group{i}-{qtype}"
            recipe = our_recipe(name, model, work, {}, "F32", calib, {"tensor_types": [{"match": patterns, "type": qtype}]})
            path = run_ours(recipe, False)
            q = quality_of(path, base, args.threads, args.seq_len)
            rows.append({"group": group, "type": qtype, "kl_mean": q["kl"]["mean"], "top1": q["kl"]["top1"],
                         "file_bytes": path.stat().st_size})
            logging.info("%-36s %-5s KL %.3e", group, qtype, q["kl"]["mean"])
            path.unlink()
    total = time.perf_counter() - t0
    cmd = "python bench/sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# KL of quantizing one tensor group at a time (the rest F32)\n",
             f"Model `{model.name}`, {base.tokens.shape[0]} held-out windows of {base.tokens.shape[1]} tokens, mean KL "
             f"against the F32 GGUF in llama.cpp, no importance statistics. Made by `{cmd.strip()}` in {total / 60:.1f} min, "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}.\n",
             "| group | " + " | ".join(args.types) + " |", "|---|" + "---:|" * len(args.types)]
    for group in GROUPS:
        kl = {r["type"]: r["kl_mean"] for r in rows if r["group"] == group}
        lines.append(f"| {group} | " + " | ".join(f"{kl[t]:.2e}" for t in args.types) + " |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    write_results(out, "sensitivity", {"command": cmd.strip(), "model": str(model), "rows": rows,
                                       "total_s": round(total, 1)}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
