"""The parts of an HF model folder that are not weights: config.json (the source's, plus a
``quantization_config``), tokenizer, processor and generation files copied from the source,
and the atomic temp-folder-then-rename that every safetensors artifact goes through."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from quantize.atomic import atomic_folder  # noqa: F401  (re-exported for the writers)

log = logging.getLogger(__name__)

# Files a transformers model folder needs beside the weights to load the tokenizer, the
# processor (image and audio preprocessing) and the generation defaults.
SIDE_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "generation_config.json",
)


def side_files(source: Path) -> list[Path]:
    return [source / n for n in SIDE_FILES if (source / n).is_file()]


def copy_side_files(source: Path, dest: Path) -> list[Path]:
    out = []
    for f in side_files(source):
        shutil.copyfile(f, dest / f.name)
        out.append(dest / f.name)
    if not any(p.name in ("tokenizer.json", "tokenizer.model") for p in out):
        log.warning("%s: no tokenizer.json or tokenizer.model to copy; the artifact will need a tokenizer from elsewhere", source)
    return out


def write_config(source_config: dict, dest: Path, quantization_config: dict | None) -> Path:
    cfg = dict(source_config)
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    path = dest / "config.json"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


