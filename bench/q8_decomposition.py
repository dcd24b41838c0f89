"""What a Q8_0 KL ratio against llama.cpp is made of: one of our choices changed at a time.

    python bench/q8_decomposition.py                      # the `tiny` bench model
    python bench/q8_decomposition.py --bench-model wide   # the decoder-dominated one

Needs bench/compare_llamacpp.py to have run on the same model (its work folder holds the F32
reference GGUF and llama.cpp's plain Q8_0). Our variants, all Q8_0 blocks (int8 g32):

- ``rtn-plain``: RTN everywhere: llama.cpp's algorithm; the bytes differ from its file only
  because llama.cpp quantizes its F16 file (weights rounded to fp16 first) and we the checkpoint;
- ``ls-token`` / ``ls-per-layer`` / ``ls-both``: least-squares block scales (``importance: true``
  without statistics, see quantize.methods.dispatch) on the tied token embedding (also the
  output layer), on the per-layer table, on both;
- ``gptq-plain``, ``gptq-ls-both``: the decoder by GPTQ int8 (``gptq-ls-both`` is
  compare_llamacpp's ``ours-Q8_0``);
- ``rtn-dither-2`` / ``-4`` / ``-6``: ``rtn-plain`` with the token embedding's block scales
  multiplied by 1.002 / 1.004 / 1.006 after the RTN choice (bench-only: the run's RTN is wrapped
  for that one tensor). Each is RTN's rounding of the same table on a grid a fraction of a
  percent coarser: a squared error within about 2-9% of RTN's (the largest value of a block is
  no longer exact), but a different *realization* of the rounding. How far these move the KL
  from ``rtn-plain`` is the **rounding-realization floor**: the paired interval over windows
  does not cover it (the same rounded table is scored on every window), so a difference
  between two quantizers of the table smaller than that spread says nothing about which
  algorithm is better. (Also measured, 2026-11-29, not kept as variants: output-aware scales
  weighted by the final hidden state's second moment, and GPTQ of the tied table with that
  state's Hessian; neither beat plain RTN on both models, and their calibration-text KL did not
  rank their held-out KL: Spearman 0.55 on ``wide``, -0.17 on ``tiny``.)

KL of each file against the F32 GGUF, in llama.cpp, with compare_llamacpp's harness (same
windows). Results: bench/results/q8_decomposition[-wide].json / .md.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.bench_models import BENCH_MODELS, bench_model, results_suffix  # noqa: E402

LS = {"preset": "int8", "importance": True}
GPTQ8 = {"type": "int8", "method": "gptq"}
VARIANTS = {
    "rtn-plain": {"text": "int8", "token_embeddings": "int8", "per_layer_embeddings": "int8"},
    "ls-token": {"text": "int8", "token_embeddings": LS, "per_layer_embeddings": "int8"},
    "ls-per-layer": {"text": "int8", "token_embeddings": "int8", "per_layer_embeddings": LS},
    "ls-both": {"text": "int8", "token_embeddings": LS, "per_layer_embeddings": LS},
    "gptq-plain": {"text": GPTQ8, "token_embeddings": "int8", "per_layer_embeddings": "int8"},
    "gptq-ls-both": {"text": GPTQ8, "token_embeddings": LS, "per_layer_embeddings": LS},
}
# rtn-plain with the token embedding's block scales multiplied by these after rounding (see above)
DITHER = {"rtn-dither-2": 1.002, "rtn-dither-4": 1.004, "rtn-dither-6": 1.006}
for _name in DITHER:
    VARIANTS[_name] = VARIANTS["rtn-plain"]


@contextmanager
def scaled_token_table(mult: float | None):
    """While active, the run's RTN of the token embedding uses block scales ``mult`` times RTN's
    (rounded to fp16 again), codes re-rounded to them; every other tensor is untouched."""
    if mult is None:
        yield
        return
    import torch

    from quantize.fit.streamed_probe import TOKEN_TABLE
    from quantize.methods import dispatch, rtn
    from quantize.qtensor import QuantizedTensor

    plain = dispatch.quantize_tensor

    def wrapped(name, weight, scheme, importance=None):
        if name != TOKEN_TABLE:
            return plain(name, weight, scheme, importance)
        assert scheme.type == "int8" and not scheme.importance, scheme
        groups = rtn.group_view(rtn.as_rows(weight), scheme.effective_group)
        scale, _ = rtn.int_scales(groups, 8, True)
        scale = (scale.to(torch.float32) * mult).to(torch.float16)
        codes = rtn.int_codes(groups, scale, None, 8)
        return QuantizedTensor(name=name, shape=tuple(weight.shape), scheme=scheme,
                               codes=codes.reshape(weight.shape[0], -1), scales=scale)

    dispatch.quantize_tensor = wrapped
    try:
        yield
    finally:
        dispatch.quantize_tensor = plain


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench-model", default="tiny", choices=list(BENCH_MODELS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-compare"), help="compare_llamacpp's work folder")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--reuse", action="store_true", help="reuse our GGUF files already built")
    # compare_llamacpp's defaults: the same calibration and evaluation windows
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--n-windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from bench.compare_llamacpp import (calibration_config, gguf_facts, kl_base_from_gguf, our_recipe, quality_of,
                                        quiet_bench_process, run_ours)
    from bench.results_file import write_results
    from eval.run import RunSettings

    args = parse_args(argv)
    quiet_bench_process(args.threads)
    t0 = time.perf_counter()
    model = bench_model(args.bench_model)
    work = Path(args.work) / model.name
    f32s = sorted((work / "reference-f32").glob("*.gguf"))
    theirs = work / "llamacpp-Q8_0.gguf"
    if not f32s or not theirs.exists():
        raise SystemExit(f"{work}: run `python bench/compare_llamacpp.py --bench-model {args.bench_model}` first "
                         "(needs its reference-f32 GGUF and llamacpp-Q8_0.gguf)")
    calib = calibration_config(args)
    emb = gguf_facts(theirs)["embeddings"]
    assert set(emb.values()) == {"Q8_0"}, emb  # llama.cpp's Q8_0 file: both tables Q8_0, as ours
    files = {"llama.cpp Q8_0 (from F16)": theirs}
    for name in args.variants:
        towers = {**VARIANTS[name], "per_layer_projections": "int8"}
        with scaled_token_table(DITHER.get(name)):
            files[name] = run_ours(our_recipe(f"q8-{name}", model, work, towers, "auto", calib), args.reuse)
    settings = RunSettings(seq_len=args.seq_len, n_windows=args.n_windows, threads=args.threads)
    base = kl_base_from_gguf(f32s[0], model, settings, args.threads)
    rows = []
    for name, path in files.items():
        q = quality_of(path, base, args.threads, args.seq_len)
        rows.append({"file": name, "path": str(path), "bytes": path.stat().st_size, "kl": q["kl"]["mean"],
                     "kl_windows": q["kl"]["window_means"], "top1": q["kl"]["top1"], "ppl": q.get("ppl")})
    ref = rows[0]["kl"]
    from eval.kl import paired_ratio

    for r in rows[1:]:  # paired over the same windows: what the windows share cancels
        r["ratio_ci"] = paired_ratio(r["kl_windows"], rows[0]["kl_windows"])
    by = {r["file"]: r for r in rows}
    floor = None
    if "rtn-plain" in by and any(d in by for d in DITHER):
        # the dithered tables against plain RTN: how far a change of rounding realization moves the KL
        floor = {d: paired_ratio(by[d]["kl_windows"], by["rtn-plain"]["kl_windows"]) for d in DITHER if d in by}
    cmd = "python bench/q8_decomposition.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Q8_0: one choice at a time ({args.bench_model} bench model)", "",
             f"`{cmd.strip()}`, {args.threads} threads, {datetime.now(timezone.utc):%Y-%m-%d}, "
             f"{(time.perf_counter() - t0) / 60:.1f} min. KL against the F32 GGUF in llama.cpp, {args.n_windows} windows "
             f"of {args.seq_len} tokens (compare_llamacpp's harness). Model `{model.name}`.", "",
             "| file | MiB | mean KL | / llama.cpp Q8_0 (paired 95% bootstrap interval over the windows) | top-1 |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        ci = r.get("ratio_ci")
        iv = f" ({ci['lo']:.3f}-{ci['hi']:.3f})" if ci else ""
        lines.append(f"| {r['file']} | {r['bytes'] / 2**20:.2f} | {r['kl']:.3e} | {r['kl'] / ref:.3f}{iv} | {r['top1']:.3f} |")
    if floor:
        lo, hi = min(f["ratio"] for f in floor.values()), max(f["ratio"] for f in floor.values())
        lines += ["", f"Rounding-realization floor: the `rtn-dither-*` files have **{lo:.3f}-{hi:.3f}x** the KL of "
                  "`rtn-plain` (" + ", ".join(f"{d}: {f['ratio']:.3f} ({f['lo']:.3f}-{f['hi']:.3f})" for d, f in floor.items())
                  + "). The same algorithm moved by a change of rounding realization alone: a difference between two "
                  "table quantizers inside this range is not a difference of algorithms."]
    md = "\n".join(lines) + "\n"
    suffix = results_suffix(args.bench_model)
    write_results(args.out, f"q8_decomposition{suffix}", {"command": cmd.strip(), "model": model.name, "rows": rows,
                                                        "realization_floor": floor}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
