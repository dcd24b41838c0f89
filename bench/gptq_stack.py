"""GPTQ of linears that share a Hessian, stacked into one run (``gptq_quantize_shared``, what
the sequential engine does up to ``GPTQ_STACK_ROWS`` rows) against one run per linear, on E4B's
shapes: q/k/v (2048 + 512 + 512 rows) and gate/up (16384 + 16384), 2048 columns, int4 g32
act-order (recipes/int4.yaml), a dense Hessian from ``--tokens`` synthetic inputs.

    python bench/gptq_stack.py [--rounds 3] [--threads 2]

The two sides alternate in one process, ``--rounds`` times each; the table gives each side's
best and median wall seconds and the stacked/alone ratio of the medians, and whether the codes
are the same bit for bit. Results: ``--out``/gptq_stack.json and .md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GROUPS = {"q/k/v": [2048, 512, 512], "gate/up": [16384, 16384]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)

    import torch

    from bench.gptq_speed import inputs
    from bench.results_file import machine, write_results
    from quantize.methods.gptq import gptq_quantize, gptq_quantize_shared
    from quantize.sequential import GPTQ_STACK_ROWS
    from quantize.schemes import QuantScheme

    torch.set_num_threads(a.threads)
    scheme = QuantScheme(type="int4", method="gptq", group_size=32, act_order=True)
    _, h = inputs(1, a.cols, a.tokens)
    g = torch.Generator().manual_seed(1)
    rows_out = []
    for label, rows in GROUPS.items():
        ws = [torch.randn(r, a.cols, generator=g) * 0.02 for r in rows]
        names = [f"{label}[{i}]" for i in range(len(rows))]
        times: dict[str, list[float]] = {"alone": [], "stacked": []}
        codes = {}
        for _ in range(a.rounds):
            for side in ("alone", "stacked"):
                t = time.perf_counter()
                if side == "alone":
                    res = [gptq_quantize(n, w, h, scheme) for n, w in zip(names, ws)]
                else:
                    res = gptq_quantize_shared(names, ws, h, scheme)
                times[side].append(time.perf_counter() - t)
                codes[side] = [r.codes for r in res]
                print(f"{label} {side}: {times[side][-1]:.2f} s", flush=True)
        same = all(torch.equal(x, y) for x, y in zip(codes["alone"], codes["stacked"]))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows_out.append({"linears": label, "rows": rows, "cols": a.cols, "stacked_by_engine": sum(rows) <= GPTQ_STACK_ROWS,
                         "alone_s": [round(v, 3) for v in times["alone"]], "stacked_s": [round(v, 3) for v in times["stacked"]],
                         "ratio_median": round(med["stacked"] / med["alone"], 3), "same_codes": same})
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# GPTQ stacked vs one linear at a time ({when})", "",
          f"{machine()}; {a.threads} threads; int4 g32 act-order, dense Hessian of {a.tokens} tokens; "
          f"{a.rounds} alternated rounds; the engine stacks up to GPTQ_STACK_ROWS = {GPTQ_STACK_ROWS} rows.", "",
          "| linears | rows | alone: best / median s | stacked: best / median s | stacked / alone (median) | same codes | engine stacks |",
          "|---|---|---:|---:|---:|---|---|"]
    for r in rows_out:
        md.append(f"| {r['linears']} | {' + '.join(map(str, r['rows']))} x {r['cols']} | {min(r['alone_s']):.2f} / "
                  f"{statistics.median(r['alone_s']):.2f} | {min(r['stacked_s']):.2f} / {statistics.median(r['stacked_s']):.2f} | "
                  f"{r['ratio_median']:.2f}x | {'yes' if r['same_codes'] else 'NO'} | {'yes' if r['stacked_by_engine'] else 'no'} |")
    write_results(a.out, "gptq_stack", {"when": when, "machine": machine(), "threads": a.threads, "rows": rows_out},
                  "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
