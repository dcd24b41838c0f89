"""The results file: one JSON document per artifact and device, with a schema version.

    {
      "schema_version": 1,
      "name": "int4-gguf",                       # short label used in reports
      "artifact": {"path", "kind": "gguf"|"safetensors", "size_bytes", "sha256"},   # path: absolute, or
                                                 # relative to this file's folder (quantize run's own artifacts)
      "reference": {"path", "sha256"},
      "backend": "transformers"|"llamacpp",
      "device": {"kind": "cpu"|"cuda"|"cuda:N", "label": "...", "fingerprint": {...}},
      "settings": {"seq_len", "n_windows", "threads", "kl_top_k", "text_sha256"},
      "text": {"source": "embedded"|"files"|"hub", "text_sha256", "documents",
               embedded: "split", "corpus_sha256"; files: "path", "column", "files": [{"path", "sha256"}];
               hub: "dataset", "name", "split", "column", "fingerprint", ...},
      "quality": null | {"ppl", "ppl_stderr", "nll_mean", "n_tokens",     # when perplexity is asked
                         "kl": {"mean", "median", "p99", "max", "top1", "n_tokens"}},  # when KL is asked
      "latency": null | {"runs": [{"prompt_tokens", "decode_tokens", "ttft_s": {...},
                                   "decode_s": {...}, "prefill_tok_s", "decode_tok_s"}],
                         "repeats", "warmup", "memory": {...}, "tegrastats": {...}|null},
      "towers": null | {"vision": {"cosine_mean", "cosine_min", "n"}, "audio": {...}},
      "created": "ISO-8601 UTC"
    }
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from eval.errors import EvalError
from eval.atomic_file import write_text_atomic

SCHEMA_VERSION = 1
REQUIRED = ("schema_version", "name", "artifact", "backend", "device", "quality")


def sha256_of(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def size_on_disk(path: str | Path) -> int:
    """Bytes of a file, or of every file in a folder (configs and tokenizer included)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def path_tag(artifact_path: str | Path) -> str:
    """8 hex digits of the sha256 of the artifact's recorded path (absolute, or relative to the
    results folder): same-named artifacts in different folders get different results files, and
    re-evaluating one path replaces its own results."""
    return hashlib.sha256(str(artifact_path).encode()).hexdigest()[:8]


def result_filename(name: str, device_label: str, backend: str, artifact_path: str | Path) -> str:
    return f"{slug(name)}-{path_tag(artifact_path)}__{slug(backend)}__{slug(device_label)}.json"


def write_result(result: dict, out_dir: str | Path) -> Path:
    """Write atomically (temp file, then rename) as ``NAME-PATHTAG__BACKEND__DEVICE.json``
    (``path_tag`` of the artifact's recorded path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / result_filename(result["name"], result["device"]["label"], result["backend"], result["artifact"]["path"])
    return write_text_atomic(path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def load_result(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{path}: not a readable results file ({e})") from e
    if not isinstance(data, dict):
        raise EvalError(f"{path}: results file must hold a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EvalError(f"{path}: schema_version {version!r} is not supported; expected {SCHEMA_VERSION}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise EvalError(f"{path}: missing key(s) {', '.join(missing)}")
    data["_path"] = str(path)
    return data


def load_results(paths) -> list[dict]:
    """Results from files and folders (every ``*.json`` in a folder)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(p.glob("*.json"))
            if not files:
                raise EvalError(f"{p}: folder holds no results (*.json)")
            out.extend(load_result(f) for f in files)
        elif p.exists():
            out.append(load_result(p))
        else:
            raise EvalError(f"{p}: no such results file or folder")
    return out
