"""Calibrated int4 on E4B shapes: our GPTQ run against llama.cpp's convert + imatrix + quantize.

    python bench/e4b_calibrated.py                       # 4 x 512 calibration tokens, 35 layers
    python bench/e4b_calibrated.py --calib 4x512 32x512  # both token counts of issue 13
    python bench/e4b_calibrated.py --size e4b-2          # E4B widths, 2 layers (a quick check)
    python bench/e4b_calibrated.py --calib 32x512 --compute-dtype float32    # the recipe with compute_dtype pinned
    python bench/e4b_calibrated.py --repeat 3            # both sides 3 times, back to back: medians, each run's ratio

One checkpoint of E4B's real text shapes (bench/synthetic_e4b.py, random bf16; the one
bench/conversion_cost.py keeps with ``--keep-checkpoint`` is reused), then per calibration size,
each side as its own child process, wall time and peak RSS as bench/conversion_cost.py measures
them (the kernel's ``VmHWM`` of every process in the tree):

- ours: ``python -m quantize run`` of recipes/int4.yaml (GPTQ int4 act-order on the text
  decoder, the shipped embedding and per-layer table types), text calibration only on
  N x L embedded tokens, a text GGUF only (no mmproj, no safetensors, ``--no-eval``);
- llama.cpp: ``convert_hf_to_gguf.py --outtype bf16`` (``--llamacpp-outtype``; bf16 is the
  route issue 13 measured, lossless for this bf16 checkpoint, and on an AVX512-BF16 CPU the
  faster one: ``llama-imatrix`` on a bf16 GGUF took 85 s where f16 took 124 s at 4 x 512; f16
  rounds the checkpoint's bf16 values), ``llama-imatrix`` over the same N x L tokens (our
  calibration samples decoded to text, chunks of L), ``llama-quantize --imatrix ... Q4_0``; its
  wall time is the sum, its peak the largest of the three.

Targets (issue 13): ours at most 0.35x llama.cpp's peak RSS and 1.5x its wall time. CPU seconds
(user + system of each side's processes) are reported too: on a shared machine wall time also
counts the neighbours' share of the cores, CPU time much less so.
Results: ``--out``/e4b_calibrated.json and .md (rows of earlier runs with other calibration
sizes are kept; a rerun of a size replaces its row).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GiB = 2**30
TARGET_RSS, TARGET_WALL = 0.35, 1.5
STEPS = ("convert", "imatrix", "quantize")  # llama.cpp's side, in order


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="e4b", help="e4b (35 layers) or e4b-N (E4B widths, N layers)")
    p.add_argument("--calib", nargs="+", default=["4x512"], help="calibration sizes, samples x tokens")
    p.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp (both sides)")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16", "auto"], default=None,
                   help="our recipe's compute_dtype (the calibration forward); default: the recipe's own (auto: "
                        "bfloat16 on a CPU with AVX512-BF16 or AMX, the bf16 checkpoint it is, else float32)")
    p.add_argument("--llamacpp-outtype", choices=["bf16", "f16"], default="bf16",
                   help="the GGUF llama.cpp's converter writes for imatrix and quantize (default bf16: lossless for the "
                        "bf16 checkpoint; rows before 2026-12-01 are f16)")
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench-conversion"),
                   help="where the synthetic checkpoint lives (shared with bench/conversion_cost.py)")
    p.add_argument("--tools", default=str(ROOT / ".cache" / "llama.cpp-tools" / "tools.json"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--repeat", type=int, default=1,
                   help="run both sides this many times per calibration size, each of our runs followed by llama.cpp's, "
                        "and report the medians (a shared VM's speed drifts over minutes; adjacent pairs see the same load)")
    p.add_argument("--tag", default=None,
                   help="results as e4b_calibrated-TAG (another machine's rows, e.g. avx2: they are not comparable "
                        "with the default file's)")
    return p.parse_args(argv)


def parse_calib(s: str) -> tuple[int, int]:
    try:
        n, length = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--calib {s!r}: expected SAMPLESxTOKENS, e.g. 4x512") from None
    return n, length


def our_recipe(model: Path, out: Path, n: int, length: int, force: bool, compute_dtype: str | None = None) -> dict:
    """recipes/int4.yaml with this bench's model, output, calibration, exports and, unless None,
    compute dtype."""
    import yaml

    r = yaml.safe_load((ROOT / "recipes" / "int4.yaml").read_text())
    r.update(name=out.name, model=str(model), output=str(out))
    if compute_dtype is not None:
        r["compute_dtype"] = compute_dtype
    r["calibration"] = {"text": {"source": "embedded", "n_samples": n, "seq_len": length},
                        "images": {"n_samples": 0}, "audio": {"n_samples": 0}}
    # the synthetic checkpoint carries the tiny model's towers: kept, so the text side is what is timed
    r["towers"].update(vision="keep", audio="keep")
    r["exports"] = {"gguf": {**r["exports"]["gguf"], "mmproj": False, "force": force}}
    r.pop("eval", None)
    return r


def run_calib(model: Path, n: int, length: int, args, tools, work: Path) -> dict:
    from bench.compare_llamacpp import write_calibration_text
    from bench.conversion_cost import measure  # raises with the log's tail when a step fails

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    layers = json.loads((model / "config.json").read_text())["text_config"]["num_hidden_layers"]
    sw = work / f"calibrated-{n}x{length}"
    if sw.exists():
        shutil.rmtree(sw)
    sw.mkdir(parents=True)
    res: dict = {"calib": f"{n}x{length}", "tokens": n * length, "layers": layers}

    out = sw / "ours"
    recipe = sw / "ours.yaml"
    recipe.write_text(json.dumps(our_recipe(model, out, n, length, force=layers != 35,
                                            compute_dtype=args.compute_dtype)))  # JSON is YAML
    print(f"[{n}x{length}] ours: quantize run (GPTQ) ...", flush=True)
    m = measure([sys.executable, "-m", "quantize", "run", recipe, "--no-eval"], env, sw / "ours.log")
    m["gguf_bytes"] = sum(f.stat().st_size for f in out.glob("*.gguf"))
    res["ours"] = m
    # the dtype the run used (the recipe's auto resolved on this machine), from its manifest
    used = json.loads((out / "manifest.json").read_text())["calibration"]["decoder_compute_dtype"]
    res["compute_dtype"], res["recipe_compute_dtype"] = used["used"], used["recipe"]
    print(f"[{n}x{length}] ours: {m['wall_s']:.1f} s, peak {m['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    # the same samples our run calibrated on, as text for llama-imatrix (chunks of `length`)
    cal = {"text": {"source": "embedded", "n_samples": n, "seq_len": length}, "images": {"n_samples": 0},
           "audio": {"n_samples": 0}}
    text = sw / "calibration.txt"
    res["calibration_text"] = write_calibration_text(model, cal, text)
    res["calibration_text"]["path"] = text.name
    res["llamacpp_outtype"] = args.llamacpp_outtype
    conv = sw / f"llamacpp-{args.llamacpp_outtype.upper()}.gguf"
    imat, q4 = sw / "imatrix.gguf", sw / "llamacpp-Q4_0.gguf"
    steps = {
        "convert": ([sys.executable, tools.converter, model, "--outtype", args.llamacpp_outtype, "--outfile", conv],
                    dict(env, PYTHONPATH=f"{tools.gguf_py}")),
        "imatrix": ([tools.exe("llama-imatrix"), "-m", conv, "-f", text, "-o", imat, "-c", length, "-b", length,
                     "-t", args.threads, "-ngl", 0, "--no-ppl", "--chunks", n], env),
        "quantize": ([tools.exe("llama-quantize"), "--allow-requantize", "--imatrix", imat, conv, q4, "Q4_0",
                      args.threads], env),
    }
    lc: dict = {}
    for step, (cmd, step_env) in steps.items():
        print(f"[{n}x{length}] llama.cpp {step} ...", flush=True)
        lc[step] = measure(cmd, step_env, sw / f"llamacpp-{step}.log")
        print(f"[{n}x{length}] llama.cpp {step}: {lc[step]['wall_s']:.1f} s, "
              f"peak {lc[step]['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    lc["wall_s"] = round(sum(lc[s]["wall_s"] for s in steps), 2)
    lc["cpu_s"] = round(sum(lc[s]["cpu_s"] for s in steps), 2)
    lc["peak_rss_bytes"] = max(lc[s]["peak_rss_bytes"] for s in steps)
    lc["gguf_bytes"] = q4.stat().st_size
    res["llamacpp"] = lc
    res["ratio"] = {"wall": m["wall_s"] / lc["wall_s"], "cpu": m["cpu_s"] / lc["cpu_s"],
                    "peak_rss": m["peak_rss_bytes"] / lc["peak_rss_bytes"]}
    res["load_average"] = os.getloadavg()
    for f in (conv, imat, q4):
        f.unlink(missing_ok=True)
    return res


def combine(runs: list[dict]) -> dict:
    """One row from ``--repeat`` runs of ``run_calib`` on the same size: every time, CPU time and
    peak (ours, and each llama.cpp step and their sums) is the median over the runs, and each
    ratio is the median of the runs' own ratios (each run's two sides ran back to back, so a
    pair's ratio saw one load). ``repeats`` keeps each run's wall times, ratios and load."""
    if len(runs) == 1:
        return runs[0]
    med = statistics.median

    def medians(dicts: list[dict]) -> dict:
        return {k: med(d[k] for d in dicts) for k in dicts[0] if isinstance(dicts[0][k], (int, float))}

    r = dict(runs[-1])  # the size, dtypes and calibration text are the same in every run
    r["ours"] = medians([x["ours"] for x in runs])
    lc = medians([x["llamacpp"] for x in runs])
    for step in STEPS:
        lc[step] = medians([x["llamacpp"][step] for x in runs])
    r["llamacpp"] = lc
    r["ratio"] = medians([x["ratio"] for x in runs])
    r["repeats"] = [{"ours_wall_s": x["ours"]["wall_s"], "llamacpp_wall_s": x["llamacpp"]["wall_s"],
                     "ratio": x["ratio"], "load_average": x.get("load_average")} for x in runs]
    return r


def verdict(r: dict) -> str:
    if r["layers"] != 35:  # a cut-down checkpoint: llama.cpp's peak shrinks with its per-layer table
        return f"not a target row ({r['layers']} of E4B's 35 layers: per-layer cost and peak only)"
    miss = [what for what, ok in (("RSS", r["ratio"]["peak_rss"] <= TARGET_RSS),
                                  ("wall time", r["ratio"]["wall"] <= TARGET_WALL)) if not ok]
    return "met" if not miss else "MISSED: " + " and ".join(miss)


def _dtype(r: dict) -> str:
    """The row's calibration dtype, and "(auto)" where the recipe left the choice to the machine."""
    return r.get("compute_dtype", "float32") + (" (auto)" if r.get("recipe_compute_dtype") == "auto" else "")


def _outtype(r: dict) -> str:
    """The GGUF type llama.cpp's side converted to (rows before the option existed: f16)."""
    return r.get("llamacpp_outtype", "f16")


def wall_ratio_cell(r: dict) -> str:
    """The wall ratio; for a ``--repeat`` row the median, with each run's ratio in run order."""
    reps = r.get("repeats")
    if not reps:
        return f"{r['ratio']['wall']:.2f}"
    return f"{r['ratio']['wall']:.2f} (median of {len(reps)}: " + ", ".join(f"{x['ratio']['wall']:.2f}" for x in reps) + ")"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| calibration | layers | our compute dtype | ours wall s (CPU s) | ours peak GiB | llama.cpp converts to | llama.cpp wall s "
             "(convert + imatrix + quantize; CPU s) | llama.cpp peak GiB | wall ratio | CPU ratio | RSS ratio | target (<= 1.5x wall, "
             "<= 0.35x RSS) |",
             "|---|---:|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lc = r["llamacpp"]
        parts = " + ".join(f"{lc[s]['wall_s']:.0f}" for s in STEPS)
        lines.append(f"| {r['calib']} | {r['layers']} | {_dtype(r)} | {r['ours']['wall_s']:.0f} ({r['ours']['cpu_s']:.0f}) | "
                     f"{r['ours']['peak_rss_bytes'] / GiB:.2f} | {_outtype(r)} | {lc['wall_s']:.0f} ({parts}; {lc['cpu_s']:.0f}) | "
                     f"{lc['peak_rss_bytes'] / GiB:.2f} | {wall_ratio_cell(r)} | {r['ratio']['cpu']:.2f} | "
                     f"{r['ratio']['peak_rss']:.3f} | {verdict(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from bench import llamacpp_tools as lt
    from bench.conversion_cost import size_model
    from bench.results_file import machine, write_results

    args = parse_args(argv)
    calibs = [parse_calib(c) for c in args.calib]
    if args.repeat < 1:
        raise SystemExit(f"--repeat {args.repeat}: give 1 or more runs")
    tools = lt.find_tools(args.tools)
    for exe in ("llama-imatrix", "llama-quantize"):
        if not tools.has(exe) or tools.converter is None:
            raise SystemExit(f"{exe} or convert_hf_to_gguf.py is not built; run bench/build_llamacpp_tools.sh first")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, why = size_model(args.size, work)
    if model is None:
        raise SystemExit(f"size {args.size}: {why}")
    out = Path(args.out)
    name = "e4b_calibrated" + (f"-{args.tag}" if args.tag else "")
    jpath = out / f"{name}.json"
    old = json.loads(jpath.read_text())["rows"] if jpath.exists() else []
    key = lambda r: (r["calib"], r["layers"], r.get("compute_dtype", "float32"), _outtype(r))  # noqa: E731
    rows = {key(r): r for r in old}
    for n, length in calibs:
        r = combine([run_calib(model, n, length, args, tools, work) for _ in range(args.repeat)])
        rows[key(r)] = r
        print(f"[{n}x{length}] wall ratio {r['ratio']['wall']:.2f}, RSS ratio {r['ratio']['peak_rss']:.3f}: {verdict(r)}",
              flush=True)
    ordered = sorted(rows.values(), key=lambda r: (-r["layers"], r["tokens"], r.get("compute_dtype", "float32") != "float32",
                                                   _outtype(r) != "f16"))
    cmd = "python bench/e4b_calibrated.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()[0]
    header = (f"# Calibrated int4 on E4B shapes: ours vs llama.cpp\n\n`{cmd.strip()}` (last run), {args.threads} threads "
              f"on {os.cpu_count()} cores, load average {load:.1f} at the end, "
              f"{datetime.now(timezone.utc):%Y-%m-%d}. Checkpoint: bench/synthetic_e4b.py (E4B's text shapes, random "
              "bf16). Ours: `quantize run` of recipes/int4.yaml (GPTQ int4 act-order, streamed calibration, text "
              "GGUF; `compute_dtype` as the row says: the recipe's own unless `--compute-dtype`, which is auto since 2026-12-01 "
              "and was float32 before). Machine of the last run: " + machine() + ". llama.cpp: convert (to the GGUF type the row says: bf16 since 2026-12-01, lossless for this checkpoint "
              "and faster here; f16 before) + llama-imatrix on the same tokens + llama-quantize Q4_0 with the imatrix. Peak: the largest VmHWM of any process in each side's tree.")
    md = markdown(ordered, header)
    write_results(out, name, {"command": cmd.strip(), "rows": ordered}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
