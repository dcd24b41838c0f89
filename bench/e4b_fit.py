"""`quantize fit` on E4B shapes: measuring and fitting against the calibrated int4 run.

    python bench/e4b_fit.py                          # fit to 4.5 bpw, probes on 4 x 128 tokens
    python bench/e4b_fit.py --baseline-from bench/results/e4b_calibrated.json   # reuse that run's row
    python bench/e4b_fit.py --size e4b-2             # E4B widths, 2 layers (a quick check)

One checkpoint of E4B's real text shapes (bench/synthetic_e4b.py, random bf16, shared with
bench/conversion_cost.py and bench/e4b_calibrated.py), then, each as its own child process with
wall time, CPU time and peak RSS measured as bench/conversion_cost.py does (VmHWM of the tree):

- fit: ``python -m quantize fit`` of recipes/int4.yaml with ``exports.gguf.fit`` (a byte budget
  from ``--budget``, probes on ``--samples`` x ``--seq-len`` embedded calibration tokens, the
  default probe type Q4_0): weight errors at every candidate type, the streamed probes, the
  allocation, the plain recipe and its text GGUF (``--no-eval``);
- the baseline: ``python -m quantize run`` of recipes/int4.yaml (GPTQ int4 act-order,
  ``--calib`` tokens, text GGUF), as bench/e4b_calibrated.py runs it; or, with
  ``--baseline-from``, that script's recorded row (the table says which: a recorded row was
  measured at another time and load).

Target (issue 14): fit costs at most 2x the calibrated int4 run. Results: ``--out``/e4b_fit.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 2**30
TARGET = 2.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="e4b", help="e4b (35 layers) or e4b-N (E4B widths, N layers)")
    p.add_argument("--budget", default="4.5bpw", help="fit's budget (bytes or bits per weight)")
    p.add_argument("--samples", type=int, default=4, help="probe samples")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per probe sample")
    p.add_argument("--calib", default="4x512", help="the baseline's calibration, samples x tokens")
    p.add_argument("--baseline-from", help="bench/e4b_calibrated.json or e4b_fit.json: take the calibrated run recorded "
                   "there (same --calib and layers) instead of running it")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-conversion"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def fit_recipe(model: Path, out: Path, budget: str, samples: int, seq_len: int, force: bool) -> dict:
    from bench.e4b_calibrated import our_recipe

    r = our_recipe(model, out, samples, seq_len, force, compute_dtype="float32")  # as the baseline
    r["exports"]["gguf"]["fit"] = {"budget": budget, "samples": samples}
    return r


def phases(log_text: str) -> dict:
    """fit's own account of its measuring time (its log line "measured in ... (weight errors A s, probes B s)")."""
    m = re.search(r"weight errors (\d+) s, probes (\d+) s", log_text)
    return {"weight_errors_s": int(m.group(1)), "probes_s": int(m.group(2))} if m else {}


def main(argv=None) -> int:
    from bench.conversion_cost import measure, size_model
    from bench.e4b_calibrated import our_recipe, parse_calib
    from bench.results_file import write_results

    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, why = size_model(args.size, work)
    if model is None:
        raise SystemExit(f"size {args.size}: {why}")
    layers = json.loads((model / "config.json").read_text())["text_config"]["num_hidden_layers"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    sw = work / "fit"
    if sw.exists():
        shutil.rmtree(sw)
    sw.mkdir(parents=True)
    res: dict = {"size": args.size, "layers": layers, "budget": args.budget, "probe_tokens": f"{args.samples}x{args.seq_len}"}

    out = sw / "fit-out"
    recipe = sw / "fit.yaml"
    recipe.write_text(json.dumps(fit_recipe(model, out, args.budget, args.samples, args.seq_len, layers != 35)))
    print(f"fit: quantize fit --budget {args.budget} on {args.samples} x {args.seq_len} probe tokens ...", flush=True)
    m = measure([sys.executable, "-m", "quantize", "fit", recipe, "--no-eval"], env, sw / "fit.log")
    m.update(phases((sw / "fit.log").read_text(errors="replace")))
    m["gguf_bytes"] = sum(f.stat().st_size for f in out.glob("*.gguf"))
    res["fit"] = m
    print(f"fit: {m['wall_s']:.1f} s, peak {m['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    n, length = parse_calib(args.calib)
    if args.baseline_from:
        res["baseline"] = recorded_baseline(Path(args.baseline_from), args.calib, layers)
    else:
        bout = sw / "int4-out"
        brecipe = sw / "int4.yaml"
        # float32 pinned, as in fit's own run and the recorded rows (--baseline-from): like with like
        brecipe.write_text(json.dumps(our_recipe(model, bout, n, length, force=layers != 35, compute_dtype="float32")))
        print(f"baseline: quantize run recipes/int4.yaml (GPTQ, {args.calib}) ...", flush=True)
        b = measure([sys.executable, "-m", "quantize", "run", brecipe, "--no-eval"], env, sw / "int4.log")
        res["baseline"] = {**b, "calib": args.calib, "source": "run in this script"}
        shutil.rmtree(bout, ignore_errors=True)
    base = res["baseline"]
    res["ratio"] = {"wall": m["wall_s"] / base["wall_s"], "cpu": m["cpu_s"] / base["cpu_s"]}
    res["met"] = res["ratio"]["wall"] <= TARGET
    res["load_average"] = os.getloadavg()
    res["command"] = "python bench/e4b_fit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    res["date"] = f"{datetime.now(timezone.utc):%Y-%m-%d}"

    out_dir = Path(args.out)
    jpath = out_dir / "e4b_fit.json"
    old = json.loads(jpath.read_text()).get("rows", []) if jpath.exists() else []
    key = lambda r: (r["layers"], r["budget"], r["probe_tokens"])  # noqa: E731
    rows = {key(r): r for r in old}
    rows[key(res)] = res  # a rerun of a setting replaces its row; other settings' rows are kept
    ordered = sorted(rows.values(), key=lambda r: (-r["layers"], r["budget"], r["fit"].get("probes_s", 0)))
    md = markdown(ordered, args.threads)
    write_results(out_dir, "e4b_fit", {"rows": ordered}, md)
    print(md)
    return 0


def recorded_baseline(path: Path, calib: str, layers: int) -> dict:
    """The calibrated run of ``calib`` at ``layers`` layers from bench/e4b_calibrated.json (its
    rows' ``ours``) or from an earlier e4b_fit.json (a baseline it ran itself)."""
    rows = json.loads(path.read_text())["rows"]
    for r in rows:
        if r["layers"] != layers or r.get("compute_dtype", "float32") != "float32":  # float32 runs, as fit's
            continue
        if r.get("calib") == calib and "ours" in r:
            return {**r["ours"], "calib": calib, "source": f"recorded in {path.name} ({r.get('load_average', ['?'])[0]} load)"}
        b = r.get("baseline") or {}
        if b.get("calib") == calib and b.get("source") == "run in this script":
            return {**b, "source": f"recorded in {path.name} (run by `{r['command']}`)"}
    raise SystemExit(f"{path}: no calibrated run of {calib} at {layers} layers")


def markdown(rows: list[dict], threads: int) -> str:
    lines = ["# fit on E4B shapes against the calibrated int4 run\n",
             f"Checkpoint: bench/synthetic_e4b.py (E4B's text shapes, random bf16), {threads} threads on {os.cpu_count()} "
             "cores. fit: `quantize fit` of recipes/int4.yaml with `exports.gguf.fit` (the budget, probes at Q4_0 on "
             "the probe tokens, gradient probes, streamed), the text GGUF written, no eval. Baseline: `quantize run` of "
             "recipes/int4.yaml (GPTQ int4 act-order, text GGUF). Target: fit at most "
             f"{TARGET}x the calibrated run's wall time. One row per setting (the last run of each).\n",
             "| layers | budget | probe tokens | fit wall s (CPU s) | weight errors s | probes s | fit peak GiB | "
             "calibrated run wall s (CPU s), peak GiB | ratio (wall) | target | run |",
             "|---:|---|---|---:|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        f, b = r["fit"], r["baseline"]
        lines.append(f"| {r['layers']} | {r['budget']} | {r['probe_tokens']} | {f['wall_s']:.0f} ({f['cpu_s']:.0f}) | "
                     f"{f.get('weight_errors_s', '-')} | {f.get('probes_s', '-')} | {f['peak_rss_bytes'] / GiB:.2f} | "
                     f"{b['wall_s']:.0f} ({b['cpu_s']:.0f}), {b['peak_rss_bytes'] / GiB:.2f} ({b.get('calib', '?')}; "
                     f"{b['source']}) | **{r['ratio']['wall']:.2f}x** | {'met' if r['met'] else 'MISSED'} | "
                     f"`{r['command']}`, {r.get('date', '')}, load {r['load_average'][0]:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
