"""What a sweep costs over running its variants one after another.

    python bench/sweep_overhead.py            # three RTN variants of the tiny random model, GGUF only

Wall time of ``python -m quantize sweep`` (a local Ray instance started and stopped, three
variant tasks, files shipped through the object store and written by the driver) against three
``python -m quantize run`` of the same variant recipes in a row, then of the sweep run again
(every variant skipped: the resume path). Every variant of the sweep is checked to equal the
plain run's files byte for byte. Results: ``--out``/sweep_overhead.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BASE = {"model": "builtin:tiny-random", "output": "ignored", "exports": {"gguf": {"mix": "auto", "mmproj": False}}}
SCHEMES = ["int4", "int8", "int8_row"]


def _timed(args: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "quantize", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)

    from eval.atomic_file import write_text_atomic
    from quantize import sweep
    from quantize.model import resolve_model

    resolve_model(BASE["model"])  # build the tiny model once, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "sweep").mkdir()
        (tmp / "plain").mkdir()
        spec_path = tmp / "sweep" / "sweep.yaml"
        spec_path.write_text(yaml.safe_dump({"name": "overhead", "base": BASE, "output": "out", "grid": {"towers.text": SCHEMES}}))
        _, variants = sweep.load(spec_path)
        plain = 0.0
        for v in variants:
            recipe = tmp / "plain" / f"{v.name}.yaml"
            recipe.write_text(yaml.safe_dump(v.recipe.model_dump(mode="json")))
            plain += _timed(["run", str(recipe)], tmp / "plain")
        swept = _timed(["sweep", str(spec_path)], tmp / "sweep")
        resumed = _timed(["sweep", str(spec_path)], tmp / "sweep")
        for v in variants:
            if _files(tmp / "sweep" / v.out) != _files(tmp / "plain" / v.out):
                raise SystemExit(f"variant {v.name}: the sweep's files differ from quantize run's")

    cores = len(os.sched_getaffinity(0))
    text = "\n".join([
        "# Sweep overhead", "",
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {cores} cores (shared with other work), `python bench/sweep_overhead.py`. "
        f"Three variants of `builtin:tiny-random` (text decoder {', '.join(SCHEMES)}; RTN, GGUF only), no evaluation.", "",
        "| what | wall (s) | ratio to plain |", "|---|---:|---:|",
        f"| 3 x `quantize run`, one after another | {plain:.1f} | 1.00 |",
        f"| `quantize sweep` (local Ray, 3 tasks) | {swept:.1f} | {swept / plain:.2f} |",
        f"| `quantize sweep` again (all skipped) | {resumed:.1f} | {resumed / plain:.2f} |", "",
        "Each sweep variant equals the plain run's files byte for byte (checked). The sweep's time "
        "includes starting and stopping a local Ray instance, the dry run of every variant on the "
        "driver (its resource request), a worker process per task (each imports torch) and the "
        "files' trip through the object store; its tasks run in parallel up to the node's CPUs.", ""])
    write_text_atomic(args.out / "sweep_overhead.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
