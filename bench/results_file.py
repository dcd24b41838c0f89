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
