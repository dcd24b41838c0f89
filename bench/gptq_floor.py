"""The least wall time exact GPTQ of E4B's text decoder can take on this machine, against llama.cpp.

    python bench/gptq_floor.py                  # 4 x 512 and 32 x 512 calibration tokens (--calib)

Issue 13's target: a calibrated int4 run (GPTQ on the text decoder, text GGUF) within 1.5x of
llama.cpp's convert + imatrix + quantize wall time, at 4 x 512 and 32 x 512 tokens. This bench
asks whether *any* implementation of exact GPTQ could meet it here. It times this machine's
dense kernels at E4B's shapes and charges each layer only the work GPTQ cannot avoid:

- one forward of the layer's linears over the calibration tokens (a sequential engine needs at
  least one per layer: the next layer's inputs go through this layer's quantized weights;
  llama-imatrix also runs one), 2 x rows x cols flops per token and linear;
- the Hessian of each stage's input (q/k/v, o, gate/up, down), the symmetric half only:
  tokens x cols^2 flops;
- GPTQ's factor for each distinct Hessian: with act-order (recipes/int4.yaml) the column loop
  reads H's own Cholesky factor (quantize/methods/gptq.py), so LAPACK's Cholesky in fp32
  (spotrf, n^3/3 flops), timed at E4B's 2048 and 16384 columns; the triangular inverse that
  H^-1's factor would add (dynamic groups) is timed and reported, not charged;
- GPTQ's column updates, rows x cols^2 flops per linear.

The GEMM-shaped work is charged at the best rate measured at its shape in fp32 or bf16 (bf16 is
what the CPU does fastest; a bf16 Hessian or update would lose precision, so this is generous),
and again with the Hessians and column updates at the fp32 rate, the exact one (torch's CPU bf16
GEMM returns bf16; a Hessian from bf16-rounded products turned indefinite in a test). With few
tokens (at most a quarter of down_proj's columns) the engine runs down_proj's GPTQ in low-rank
form, whose floor is reported as "the engine's path".
Everything else is free: attention, norms, AltUp, LAuReL, reading the checkpoint, the token
and per-layer tables, GGUF encoding. So the floor is below what any exact-GPTQ run can take.
E4B: 35 layers, 20 with their own K/V (q, k, v, o) and 15 KV consumers (q, o).

llama.cpp's side is not rerun here (the E4B-shaped bench takes over an hour): its wall times and
ours come from bench/results/e4b_calibrated.json, measured on this machine with 2 threads.
Results: ``--out``/gptq_floor.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e4b_calibrated import TARGET_WALL, parse_calib  # noqa: E402  (issue 13's target: ours / llama.cpp)
from bench.synthetic_e4b import E4B_TEXT  # noqa: E402
from quantize.sequential import LOW_RANK_DIVISOR  # noqa: E402

HIDDEN, FFN, LAYERS = E4B_TEXT["hidden_size"], E4B_TEXT["intermediate_size"], E4B_TEXT["num_hidden_layers"]
KV_OUT = E4B_TEXT["num_key_value_heads"] * E4B_TEXT["head_dim"]
OWN_KV = LAYERS - E4B_TEXT["num_kv_shared_layers"]
# (rows, cols) of each linear; the stage whose Hessian it reads
LINEARS = {"q_proj": (HIDDEN, HIDDEN, "attn_in"), "k_proj": (KV_OUT, HIDDEN, "attn_in"),
           "v_proj": (KV_OUT, HIDDEN, "attn_in"), "o_proj": (HIDDEN, HIDDEN, "attn_out"),
           "gate_proj": (FFN, HIDDEN, "mlp_in"), "up_proj": (FFN, HIDDEN, "mlp_in"), "down_proj": (HIDDEN, FFN, "mlp_out")}
CONSUMER_SKIPS = ("k_proj", "v_proj")  # KV consumers compute no K/V


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", nargs="+", default=["4x512", "32x512"], help="calibration sizes, samples x tokens (as bench/e4b_calibrated.py)")
    p.add_argument("--recorded", default=str(ROOT / "bench" / "results" / "e4b_calibrated.json"),
                   help="bench/e4b_calibrated.py's results: llama.cpp's and our wall times")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: thread pools, page faults
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_rate(m: int, k: int, n: int, repeats: int) -> dict:
    """Flops per second of (m x k) @ (k x n) in fp32 and bf16, and the better of the two."""
    import torch

    g = torch.Generator().manual_seed(0)
    rates = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(m, k, generator=g).to(dt), torch.randn(k, n, generator=g).to(dt)
        rates[name] = 2 * m * k * n / _best_seconds(lambda: a @ b, repeats)
    rates["best"] = max(rates["fp32"], rates["bf16"])
    return rates


def factor_seconds(n: int, repeats: int) -> dict:
    """Wall seconds of spotrf (and, reported apart, strtri) on an n x n SPD matrix (what
    quantize/methods/gptq.py's reverse_cholesky runs in place), each timed on a fresh copy;
    ``seconds`` is what act-order GPTQ needs, the Cholesky alone."""
    import numpy as np
    from scipy.linalg import lapack

    # LAPACK's time does not depend on the values: a well-conditioned SPD matrix (I plus a small
    # symmetric perturbation, eigenvalues about 1 +- 0.7) built in O(n^2), not from a product
    rng = np.random.default_rng(0)
    h = rng.standard_normal((n, n), dtype=np.float32)
    h *= 0.25 / np.sqrt(n)
    h += h.T.copy()
    h[np.diag_indices(n)] += 1.0
    chol = tri = float("inf")
    for _ in range(max(1, repeats if n <= 4096 else 1)):
        a = np.asfortranarray(h)
        t = time.perf_counter()
        c, info = lapack.spotrf(a, lower=1, overwrite_a=1, clean=1)
        t1 = time.perf_counter()
        if info != 0:
            raise SystemExit(f"spotrf failed on the {n}-wide test matrix (info {info})")
        _, info = lapack.strtri(c, lower=1, overwrite_c=1)
        t2 = time.perf_counter()
        chol, tri = min(chol, t1 - t), min(tri, t2 - t1)
        del a, c
    return {"cholesky_s": chol, "triangular_inverse_s": tri, "seconds": chol, "flops_rate": (n**3 / 3) / chol}


def layer_work(tokens: int, own_kv: bool) -> dict:
    """Flops of one E4B layer's unavoidable GEMM-shaped work, and its distinct Hessians' widths."""
    lin = {k: v for k, v in LINEARS.items() if own_kv or k not in CONSUMER_SKIPS}
    stages = {stage: cols for _rows, cols, stage in lin.values()}
    return {
        "forward_flops": sum(2 * tokens * r * c for r, c, _ in lin.values()),
        "hessian_flops": sum(tokens * c * c for c in stages.values()),
        "update_flops": sum(r * c * c for r, c, _ in lin.values()),
        "factor_widths": sorted(stages.values()),
    }


def floor_row(samples: int, length: int, rates: dict, factors: dict, recorded: dict | None) -> dict:
    tokens = samples * length
    parts = {"forward_s": 0.0, "hessians_s": 0.0, "factors_s": 0.0, "updates_s": 0.0}
    for own_kv, count in ((True, OWN_KV), (False, LAYERS - OWN_KV)):
        w = layer_work(tokens, own_kv)
        parts["forward_s"] += count * w["forward_flops"] / rates["forward"]["best"]
        parts["hessians_s"] += count * w["hessian_flops"] / rates["hessian"]["best"]
        parts["updates_s"] += count * w["update_flops"] / rates["update"]["best"]
        parts["factors_s"] += count * sum(factors[n]["seconds"] for n in w["factor_widths"])
    row = {"calib": f"{samples}x{length}", "tokens": tokens, **{k: round(v, 1) for k, v in parts.items()},
           "floor_s": round(sum(parts.values()), 1)}
    # The same with the Hessians and column updates at the fp32 rate: the only exact one on a CPU
    # where torch's bf16 GEMM returns bf16 (a Hessian from bf16-rounded products is not a Gram
    # matrix and turned indefinite on the trained tiny model: README, "Running on the real E4B")
    fp32 = {k: rates[k]["best"] / rates[k]["fp32"] for k in ("hessian", "update")}
    row["fp32_floor_s"] = round(row["floor_s"] + parts["hessians_s"] * (fp32["hessian"] - 1)
                                + parts["updates_s"] * (fp32["update"] - 1), 1)
    if tokens * LOW_RANK_DIVISOR <= FFN:
        # With at most a quarter as many tokens (t) as down_proj's n columns the engine keeps
        # the stage's input rows and GPTQ works in low-rank form (quantize/methods/gptq.py,
        # _gptq_low_rank): no Hessian product and no n-wide Cholesky, but a block factor of
        # dampening + rank t (2 t^2 n multiply-adds) and rank-t feedback (2 rows t n), all GEMMs.
        rows, n = LINEARS["down_proj"][:2]

        def saved(rate: str) -> float:
            """Seconds per layer the low-rank path saves at the GEMM rates ``rate`` ("best", "fp32")."""
            dense = tokens * n * n / rates["hessian"][rate] + factors[FFN]["seconds"] + rows * n * n / rates["update"][rate]
            return dense - (4 * tokens * tokens * n + 4 * rows * tokens * n) / rates["update"][rate]

        row["low_rank_floor_s"] = round(row["floor_s"] - LAYERS * saved("best"), 1)
        row["low_rank_fp32_floor_s"] = round(row["fp32_floor_s"] - LAYERS * saved("fp32"), 1)
    row["engine_floor_s"] = row.get("low_rank_floor_s", row["floor_s"])  # the path the engine takes
    row["engine_fp32_floor_s"] = row.get("low_rank_fp32_floor_s", row["fp32_floor_s"])
    if recorded is not None:
        lc, ours = recorded["llamacpp"]["wall_s"], recorded["ours"]["wall_s"]
        row.update(llamacpp_s=lc, ours_s=ours, floor_ratio=round(row["engine_floor_s"] / lc, 2),
                   ours_over_floor=round(ours / row["engine_floor_s"], 2), target_s=round(TARGET_WALL * lc, 1),
                   reachable=row["engine_floor_s"] <= TARGET_WALL * lc,
                   dense_reachable=row["floor_s"] <= TARGET_WALL * lc,
                   fp32_reachable=row["engine_fp32_floor_s"] <= TARGET_WALL * lc,
                   llamacpp_quantize_s=recorded["llamacpp"]["quantize"]["wall_s"])
    return row


def main(argv=None) -> int:
    import torch

    from bench.results_file import write_results

    args = parse_args(argv)
    sizes = [parse_calib(s) for s in args.calib]
    recorded = {}
    path = Path(args.recorded)
    if path.exists():
        for r in json.loads(path.read_text())["rows"]:
            if r["layers"] == LAYERS and r.get("compute_dtype", "float32") == "float32":  # float32 runs: the floor's GEMMs are fp32
                recorded[r["calib"]] = r
    threads = torch.get_num_threads()
    print(f"timing GEMMs ({threads} threads) ...", flush=True)
    rates = {  # one 512-token batch through the widest linear; a Hessian tile; GPTQ's 128-column block update
        "forward": gemm_rate(512, HIDDEN, FFN, args.repeats),
        "hessian": gemm_rate(2048, 512, 2048, args.repeats),
        "update": gemm_rate(HIDDEN, 128, FFN, args.repeats),
    }
    print("timing the Cholesky (and triangular inverse) at 2048 and 16384 columns ...", flush=True)
    factors = {n: factor_seconds(n, args.repeats) for n in sorted({HIDDEN, FFN})}
    rows = [floor_row(n, length, rates, factors, recorded.get(f"{n}x{length}")) for n, length in sizes]

    cmd = "python bench/gptq_floor.py " + " ".join(argv if argv is not None else sys.argv[1:])
    gf = {k: {d: round(v / 1e9, 1) for d, v in r.items()} for k, r in rates.items()}
    lines = [
        "# The floor of exact GPTQ on E4B shapes on this machine, against llama.cpp\n",
        f"`{cmd.strip()}`, {threads} torch threads on {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end, {datetime.now(timezone.utc).strftime('%Y-%m-%d')}. "
        "The floor charges each of the 35 layers one forward of its linears, the symmetric half of each stage's "
        "Hessian and GPTQ's column updates at the best GEMM rate measured here in fp32 or bf16, plus LAPACK's "
        "Cholesky (fp32) of each distinct Hessian (act-order GPTQ reads H's own factor, no inverse); attention, norms, AltUp, reading the "
        "checkpoint and GGUF encoding are free. llama.cpp's and our wall times: bench/results/e4b_calibrated.json "
        "(same machine, 2 threads). Target: ours at most 1.5x llama.cpp.\n",
        f"GEMM rates, GFLOP/s (fp32 / bf16): forward {gf['forward']['fp32']} / {gf['forward']['bf16']}, "
        f"Hessian tile {gf['hessian']['fp32']} / {gf['hessian']['bf16']}, column update {gf['update']['fp32']} / "
        f"{gf['update']['bf16']}. Cholesky: "
        + ", ".join(f"{n} columns {f['cholesky_s']:.2f} s ({f['flops_rate'] / 1e9:.0f} GFLOP/s; the triangular inverse "
                    f"H^-1's factor would add: {f['triangular_inverse_s']:.2f} s)" for n, f in factors.items()) + ".\n",
        "| calibration | forward s | Hessians s | factors s | column updates s | floor s (dense factor) "
        "| floor s (the engine's path) | the same, fp32 Hessians and updates s | llama.cpp s | 1.5x llama.cpp s "
        "| engine's floor / llama.cpp | target reachable (dense factor; engine's path; the same in fp32) "
        "| ours s | ours / engine's floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if "llamacpp_s" in r:
            verdict = "; ".join("yes" if ok else "NO: the floor alone is over it"
                                for ok in (r["dense_reachable"], r["reachable"], r["fp32_reachable"]))
            tail = (f"{r['llamacpp_s']:.0f} | {r['target_s']:.0f} | {r['floor_ratio']:.2f} | {verdict} | "
                    f"{r['ours_s']:.0f} | {r['ours_over_floor']:.2f} |")
        else:
            tail = "- | - | - | not recorded | - | - |"  # llama.cpp, target, ratio, verdict, ours, ours/floor
        engine = "low-rank " + f"{r['engine_floor_s']:.0f}" if "low_rank_floor_s" in r else "the same"
        lines.append(f"| {r['calib']} | {r['forward_s']:.0f} | {r['hessians_s']:.0f} | {r['factors_s']:.0f} | "
                     f"{r['updates_s']:.0f} | {r['floor_s']:.0f} | {engine} | {r['engine_fp32_floor_s']:.0f} | " + tail)
    for r in rows:
        if "low_rank_floor_s" in r and "llamacpp_s" in r:
            with_encode = r["low_rank_floor_s"] + r["llamacpp_quantize_s"]
            lines.append(
                f"\nAt {r['calib']} ({r['tokens']} tokens, at most a quarter of down_proj's {FFN} columns) the "
                f"engine runs down_proj's GPTQ in low-rank form (`_gptq_low_rank`: no Hessian product, no "
                f"{FFN}-wide Cholesky; a block factor of dampening + rank {r['tokens']} and rank-{r['tokens']} "
                f"feedback, charged at the column-update rate): floor {r['low_rank_floor_s']:.0f} s; with the GGUF "
                f"encode that llama.cpp's own quantize step takes ({r['llamacpp_quantize_s']:.0f} s) that is "
                f"{with_encode:.0f} s against the {r['target_s']:.0f} s target: "
                + ("at or over it" if with_encode >= r["target_s"] else "under it")
                + ", with attention, norms, AltUp and reading the checkpoint still free.")
    md = "\n".join(lines) + "\n"
    write_results(args.out, "gptq_floor", {"command": cmd.strip(), "threads": threads, "gemm_rates": rates,
                                           "factors": factors, "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
