"""K-quant encoding speed: ggml's quantizer and our compiled Q4_K / Q5_K (what the GGUF writer
calls now) against the numpy encoder they replaced (tests/kquant_numpy.py), in ns per value, on
a slice of E4B's per-layer embedding table shape (262144 rows).

    python bench/kquant_speed.py                   # 262144 x 256, Q2_K..Q6_K, with and without importance
    python bench/kquant_speed.py --cols 512 --types Q4_K --threads 2

Weights are seeded Gaussians with uneven row scales and a few outlier columns; importance is a
heavy-tailed per-column vector (as calibration statistics are). Each row gives CPU ns per value
(the fair measure on a shared machine) and wall ns per value, the old encoder on one thread (it
is numpy, single-threaded), ggml on one thread and on ``--threads``, and, for Q4_K and Q5_K
without importance, ``kquant_kernels`` (numba) on one thread and on ``--threads``, its bytes
checked equal to ggml's and its speed given as a ratio to ggml's; and the importance-weighted
squared error of ggml's blocks relative to the old encoder's (gguf's dequantizer decodes both).
Results: ``--out``/kquant_speed.json and .md.
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

OLD_TYPES = ("Q4_K", "Q5_K", "Q6_K")  # what the numpy encoder handled


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=262144)
    p.add_argument("--cols", type=int, default=256)
    p.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the multi-threaded ggml run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    import numpy as np
    from gguf import GGMLQuantizationType as T, quants as gq

    from bench.results_file import write_results
    from quantize.formats.gguf import kquant_kernels, kquants
    from quantize.formats.gguf.ggml_quants import quantize_rows
    from tests.kquant_numpy import encode_kquant as numpy_encode

    args = parse_args(argv)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02
    w *= np.exp(0.5 * rng.standard_normal((args.rows, 1))).astype(np.float32)
    w[:, rng.choice(args.cols, max(1, args.cols // 64), replace=False)] *= 8
    importance = np.exp(2 * rng.standard_normal(args.cols)).astype(np.float32)
    n = w.size
    rows = []
    for name in args.types:
        qtype = T[name]
        for imp in (None, importance):
            r = {"type": name, "importance": imp is not None}
            new1, wall, cpu = timed(lambda: quantize_rows(w, qtype, imp, threads=1))
            r["ggml_1t"] = {"wall_ns": wall / n * 1e9, "cpu_ns": cpu / n * 1e9}
            newn, wall, cpu = timed(lambda: quantize_rows(w, qtype, imp, threads=args.threads))
            r["ggml_nt"] = {"wall_ns": wall / n * 1e9, "cpu_ns": cpu / n * 1e9}
            assert np.array_equal(new1, newn), f"{name}: ggml's bytes depend on the thread count"
            if kquants.compiled(qtype, imp is not None):
                kquant_kernels.encode(w[:64], qtype)  # numba's compile (or cache load) is not timed
                for key, threads in (("compiled_1t", 1), ("compiled_nt", args.threads)):
                    got, wall, cpu = timed(lambda: kquant_kernels.encode(w, qtype, threads=threads))
                    r[key] = {"wall_ns": wall / n * 1e9, "cpu_ns": cpu / n * 1e9}
                    r[key]["bytes_equal_ggml"] = bool(np.array_equal(got, new1))
                r["compiled_speedup_cpu_1t"] = r["ggml_1t"]["cpu_ns"] / r["compiled_1t"]["cpu_ns"]
                r["compiled_speedup_wall_nt"] = r["ggml_nt"]["wall_ns"] / r["compiled_nt"]["wall_ns"]
            if name in OLD_TYPES:
                old, wall, cpu = timed(lambda: numpy_encode(w, qtype, imp))
                r["numpy"] = {"wall_ns": wall / n * 1e9, "cpu_ns": cpu / n * 1e9}
                weight = 1.0 if imp is None else imp
                err = lambda raw: float((weight * (gq.dequantize(raw, qtype) - w) ** 2).sum(dtype=np.float64))  # noqa: E731
                r["error_ratio"] = err(new1) / err(old)
                r["speedup_cpu_1t"] = r["numpy"]["cpu_ns"] / r["ggml_1t"]["cpu_ns"]
                r["speedup_wall_nt"] = r["numpy"]["wall_ns"] / r["ggml_nt"]["wall_ns"]
            rows.append(r)
            print(json.dumps(r), flush=True)

    cmd = "python bench/kquant_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# K-quant encoding: ggml (ggml_quantize_chunk) and the compiled Q4_K / Q5_K vs the numpy encoder\n",
             f"`{cmd.strip()}`: {args.rows} x {args.cols} fp32 weights, {os.cpu_count()} cores, ggml also on "
             f"{args.threads} threads, load average {os.getloadavg()[0]:.1f} at the end, "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d')}. ns per value; CPU time is the fair measure on a "
             "shared machine. Error: importance-weighted squared error (plain without importance) of ggml's blocks "
             "over the numpy encoder's; ggml's bytes are llama.cpp's (tests/test_gguf.py). Compiled: "
             "quantize/formats/gguf/kquant_kernels.py (Q4_K / Q5_K without importance, what the writer uses there), "
             "its bytes compared with ggml's in this run.\n",
             "| type | importance | numpy CPU ns | ggml 1 thread CPU ns | speedup (CPU, 1 thread) | numpy wall ns | "
             f"ggml {args.threads} threads wall ns | speedup (wall) | error ggml / numpy | compiled 1 thread CPU ns | "
             f"compiled {args.threads} threads wall ns | compiled vs ggml (CPU 1 thread; wall {args.threads} threads) | "
             "compiled bytes = ggml's |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        old, comp = r.get("numpy"), r.get("compiled_1t")
        lines.append("| {} | {} | {} | {:.1f} | {} | {} | {:.1f} | {} | {} | {} | {} | {} | {} |".format(
            r["type"], "yes" if r["importance"] else "no", f"{old['cpu_ns']:.1f}" if old else "-", r["ggml_1t"]["cpu_ns"],
            f"{r['speedup_cpu_1t']:.2f}x" if old else "-", f"{old['wall_ns']:.1f}" if old else "-",
            r["ggml_nt"]["wall_ns"], f"{r['speedup_wall_nt']:.2f}x" if old else "-",
            f"{r['error_ratio']:.4f}" if old else "-",
            f"{comp['cpu_ns']:.1f}" if comp else "-", f"{r['compiled_nt']['wall_ns']:.1f}" if comp else "-",
            f"{r['compiled_speedup_cpu_1t']:.2f}x; {r['compiled_speedup_wall_nt']:.2f}x" if comp else "-",
            ("yes" if comp["bytes_equal_ggml"] and r["compiled_nt"]["bytes_equal_ggml"] else "**NO**") if comp else "-"))
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    write_results(out, "kquant_speed", {"command": cmd.strip(), "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
