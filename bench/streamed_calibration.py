"""Peak memory and time of calibration, streamed (the pipeline's) against whole-model, on E4B widths.

Builds bench/synthetic_e4b.py's checkpoint (E4B's real widths, random bf16) with ``--layers``
decoder layers, then runs, each in a child process sampling its RSS every 5 ms, the calibration
step of recipes/int4.yaml (GPTQ int4 with act-order on the text decoder, text calibration only:
``--batches`` x ``--tokens`` embedded tokens):

- streamed: ``quantize.pipeline._calibrate`` (skeleton on meta, one decoder layer resident);
- whole: ``from_pretrained`` of the whole model, then the same sequential engine (what the
  pipeline did before; ``--skip-whole`` leaves it out).

Fewer layers than E4B's 35 keep it within a shared machine; the streamed path's weights do not
grow with depth (one layer plus the token tables' calibration rows), the whole-model path's do
(about 0.44 GB of bf16 per E4B layer, plus the 1.07 GB token table and 4.7 GB per-layer table).

    python bench/streamed_calibration.py --layers 4 --batches 4 --tokens 512
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


NOTE = ("The streamed path's resident weights do not grow with depth (one decoder layer, the token tables' calibration rows); what does is the captured per-layer inputs, batches x tokens x layers x 256 x 4 bytes (73 MB at 4 x 512 and 35 layers), so E4B's 35 layers extrapolate to about 0.1 GiB more. The one-layer state dominates: one 16384-column down_proj's GPTQ Hessian alone is 1 GiB in fp32, and GPTQ works on copies of it. Whole-model path for comparison (issue 13, same shapes): 11.3 GiB after 4 of 35 layers and rising; its weights alone are 16 GB of bf16.")


def _recipe(model: Path, batches: int, tokens: int):
    from calibrate.config import CalibrationConfig
    from quantize.recipe import load_recipe

    r = load_recipe(str(ROOT / "recipes" / "int4.yaml"), model=str(model), output=str(model.parent / "unused-out"))
    cal = CalibrationConfig.model_validate({"text": {"source": "embedded", "n_samples": batches, "seq_len": tokens}})
    # Calibration only: the GGUF writer's check of llama.cpp's fixed 35-layer layout is not wanted here.
    # float32 pinned (the recipe's auto would be bf16 on an AVX512-BF16 CPU): the whole-model side
    # upcasts, and these rows were measured that way.
    return r.model_copy(update={"calibration": cal, "compute_dtype": "float32",
                                "exports": r.exports.model_copy(update={"gguf": None})})


def child(mode: str, model: Path, batches: int, tokens: int) -> dict:
    import torch

    from bench.calibration_memory import PeakSampler, rss_bytes
    from quantize.pipeline import _calibrate, prepare

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    recipe = _recipe(model, batches, tokens)
    ckpt, plan = prepare(recipe)
    base = rss_bytes()
    t0 = time.perf_counter()
    with PeakSampler() as s:
        if mode == "streamed":
            with tempfile.TemporaryDirectory(dir=model.parent) as spill:  # the pipeline spills into its output folder
                _, result, _ = _calibrate(recipe, ckpt, plan, progress=False, spill=Path(spill) / "spill")
        else:
            from transformers import Gemma3nForConditionalGeneration

            from calibrate import build_calibration
            from quantize.pipeline import load_processor
            from quantize.sequential import quantize_text_decoder

            torch.manual_seed(recipe.seed)
            calib = build_calibration(recipe.calibration, load_processor(ckpt.folder), seed=recipe.seed)
            m = Gemma3nForConditionalGeneration.from_pretrained(str(ckpt.folder), dtype="auto", use_kernels=False).eval()
            schemes = {e.name: e.scheme for e in plan.entries if e.quantized and e.tower == "text"}
            result = quantize_text_decoder(m, schemes, [{"input_ids": ids} for ids in calib.text], progress=False)
    secs = time.perf_counter() - t0
    return {"mode": mode, "seconds": round(secs, 1), "peak_rss_gib": round(s.peak / 2**30, 3),
            "baseline_rss_gib": round(base / 2**30, 3), "layers_seconds": [r["seconds"] for r in result.report.values()],
            "tensors": len(result.tensors)}


def main(argv=None) -> int:
    from bench.results_file import write_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--work", default="/tmp/streamed-calibration-bench")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--skip-whole", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("MODE", "MODEL"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), a.batches, a.tokens)))
        return 0

    from bench.synthetic_e4b import write_checkpoint
    from quantize.tiny import cached_tiny

    model = Path(a.work) / f"synthetic-e4b-{a.layers}L"
    if not (model / "config.json").is_file():
        write_checkpoint(model, cached_tiny("trained"), layers=a.layers)
    rows = []
    for mode in ("streamed",) + (() if a.skip_whole else ("whole",)):
        cmd = [sys.executable, __file__, "--child", mode, str(model), "--batches", str(a.batches), "--tokens", str(a.tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            rows.append({"mode": mode, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    cmd = "python bench/streamed_calibration.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Calibration memory, streamed vs whole model (E4B widths, {a.layers} decoder layers)", "",
             f"`{cmd.strip()}`, {os.cpu_count()} cores, GPTQ int4 act-order (recipes/int4.yaml), "
             f"{a.batches} x {a.tokens} text tokens. Peak RSS of the whole process (model load included).", "",
             NOTE, "",
             "| path | wall s | peak RSS GiB | s per layer |", "|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} | | |")
        else:
            per = sum(r["layers_seconds"]) / max(len(r["layers_seconds"]), 1)
            lines.append(f"| {r['mode']} | {r['seconds']} | {r['peak_rss_gib']} | {per:.1f} |")
    md = "\n".join(lines) + "\n"
    write_results(a.out, "streamed_calibration", {"command": cmd.strip(), "layers": a.layers, "rows": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
