"""The one way a benchmark writes its results: ``STEM.json`` (the data) and ``STEM.md`` (the
table) side by side in bench/results (or ``--out``), each written atomically, so an interrupted
run never leaves a half-written file or a json that disagrees with its markdown's run."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str | Path, stem: str, data: dict, md: str) -> None:
    from eval.atomic_file import write_text_atomic

    out = Path(out)
    # default=str: paths and numpy scalars in a result are written as text, not refused
    write_text_atomic(out / f"{stem}.json", json.dumps(data, indent=1, default=str))
    write_text_atomic(out / f"{stem}.md", md)


def machine() -> str:
    """The CPU, its vector ISA and what our ``compute_dtype: auto`` picks on it, for a results
    header: rows of an AVX2-only CPU and of an AVX512-BF16 one are not comparable."""
    import torch

    from eval.device import parse_cpuinfo
    from quantize.device import cpu_flags, native_bf16

    try:
        model = parse_cpuinfo(Path("/proc/cpuinfo").read_text())["model"]
    except OSError:
        model = "unknown CPU"
    flags = cpu_flags()
    isa = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    native, why = native_bf16(torch.device("cpu"))
    return f"{model}, {isa}; {why} (auto: {'bfloat16' if native else 'float32'})"
