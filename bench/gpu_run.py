"""One end-to-end ``quantize run`` in this process, timed: recipes/int4.yaml's allocation (GPTQ
int4 g32 act-order text decoder, Q8_0 token table, Q5_K per-layer table) with text calibration
only (``--samples`` x ``--seq-len`` embedded tokens), text GGUF only (no mmproj, no safetensors),
no evaluation, on ``--device``. Prints one JSON line: wall time of the run and of its
calibration (per decoder layer too, and the layers' time summed by phase: load, statistics,
quantize, final pass, release), peak host RSS (VmHWM of this process) and, on CUDA, peak
GPU memory (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``).

    python bench/gpu_run.py MODEL OUT [--device cuda] [--samples 4] [--seq-len 512] [--force] [--json FILE]

``--force``: write the GGUF although the model's layout is not llama.cpp's hard-coded Gemma 3n
one (a synthetic checkpoint with fewer layers, for checking this script on a CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def recipe_for(model: Path, out: Path, device: str, samples: int, seq_len: int, force: bool):
    from quantize.recipe import Recipe, load_recipe

    r = load_recipe(str(ROOT / "recipes" / "int4.yaml"), model=str(model), output=str(out), device=device)
    data = r.model_dump(mode="json", exclude_none=True)
    data["calibration"] = {"text": {**data["calibration"]["text"], "n_samples": samples, "seq_len": seq_len},
                           "images": {"n_samples": 0}, "audio": {"n_samples": 0}, "multimodal_samples": 0}
    data["exports"] = {"gguf": {**data["exports"]["gguf"], "mmproj": False, "force": force}}
    data.pop("eval", None)
    return Recipe.model_validate(data)


def run(model: Path, out: Path, device: str, samples: int, seq_len: int, force: bool) -> dict:
    import torch

    from eval.memory import peak_rss_bytes
    from quantize import pipeline

    recipe = recipe_for(model, out, device, samples, seq_len, force)
    cuda = recipe.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phases: dict = {}
    calibrate = pipeline._calibrate

    def timed_calibrate(*a, **k):  # the calibration's share of the run, and its GPU peak
        t = time.perf_counter()
        res = calibrate(*a, **k)
        phases["calibration_s"] = round(time.perf_counter() - t, 2)
        reports = list(res[1].report.values()) if res[1] else []
        phases["layer_s"] = [r["seconds"] for r in reports]
        split: dict[str, float] = {}  # where the layers' time went (quantize.sequential._PhaseClock)
        for r in reports:
            for k, v in r.get("phase_s", {}).items():
                split[k] = split.get(k, 0.0) + v
        phases["layer_phase_s"] = {k: round(v, 2) for k, v in split.items()}
        if cuda:
            phases["calibration_gpu_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return res

    pipeline._calibrate = timed_calibrate
    t0 = time.perf_counter()
    try:
        result = pipeline.run(recipe, progress=False)
    finally:
        pipeline._calibrate = calibrate
    wall = time.perf_counter() - t0
    row = {
        "model": model.name, "device": recipe.device, "samples": samples, "seq_len": seq_len,
        "wall_s": round(wall, 2), **phases,
        "export_s": round(wall - phases.get("calibration_s", 0.0), 2),
        "peak_rss_gib": round((peak_rss_bytes() or 0) / 2**30, 3),
        "gguf_bytes": sum(p.stat().st_size for p in result.artifacts if p.suffix == ".gguf"),
        "gptq_fallbacks": sum(len(e.get("fallbacks", {})) for e in result.manifest["quantization"].values()),
        # the recipe's compute_dtype: auto, as resolved on this device (bf16 on a GPU of compute capability 8.0+)
        "compute_dtype": ((result.manifest.get("calibration") or {}).get("decoder_compute_dtype") or {}).get("used"),
        "torch": torch.__version__,
    }
    if cuda:
        row["gpu"] = torch.cuda.get_device_name()
        row["gpu_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        row["gpu_max_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--force", action="store_true")
    p.add_argument("--json", type=Path, help="also write the row here")
    a = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    row = run(a.model, a.out, a.device, a.samples, a.seq_len, a.force)
    line = json.dumps(row)
    print(line, flush=True)
    if a.json:
        from eval.atomic_file import write_text_atomic

        write_text_atomic(a.json, line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
