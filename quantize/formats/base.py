"""What every format writer receives. Writers never choose schemes: they pack what the plan
and the ``TensorSource`` give them, validating the whole plan before touching disk."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize.recipe import Recipe
from quantize.source import TensorSource


@dataclass(frozen=True)
class ExportContext:
    recipe: Recipe
    source: TensorSource
    # The run's output folder (a temporary name until the whole run succeeds; the pipeline
    # renames it). Writers create their files inside it, themselves via temp names + rename.
    out_dir: Path
    # recipe name, source model reference, model hash, tool version: for file metadata.
    provenance: dict
    # Text GGUF tensors encoded while the calibration ran (``formats.gguf.preencode.PreEncoder``),
    # or None: the GGUF writer copies what they finished and encodes the rest.
    preencoded: Any = None
