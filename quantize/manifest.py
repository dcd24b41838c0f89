"""manifest.json: what was run on what, and sha256 sums of everything written.

No timestamps and no absolute temporary paths: the same recipe, model and seed give a
byte-identical manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from importlib import metadata
from pathlib import Path

MANIFEST_VERSION = 1
_VERSIONED = ("torch", "transformers", "safetensors", "gguf", "compressed-tensors", "bitsandbytes", "gemma3n-quantize")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_hash(ckpt) -> str:
    """sha256 over config.json and the safetensors shards (names and contents, sorted)."""
    from tqdm import tqdm

    h = hashlib.sha256()
    files = [ckpt.folder / "config.json", *ckpt.files]
    for f in tqdm(files, desc="hashing model", unit="file", disable=len(files) < 3):
        h.update(f.name.encode())
        h.update(bytes.fromhex(sha256_file(f)))
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def build_manifest(*, recipe, ckpt, plan, model_digest, out_dir: Path, artifacts, calibration, quantization_report, kv_scales, notes) -> dict:
    totals = {
        tower: {k: (sorted(v) if isinstance(v, set) else v) for k, v in t.items()}
        for tower, t in plan.tower_totals().items()
    }
    files = []
    for p in sorted(set(artifacts)):
        p = Path(p)
        files.append({"path": str(p.relative_to(out_dir)), "bytes": p.stat().st_size, "sha256": sha256_file(p)})
    return {
        "manifest_version": MANIFEST_VERSION,
        "recipe": recipe.model_dump(mode="json"),
        "model": {"ref": recipe.model, "sha256": model_digest, "architecture": ckpt.config.get("architectures")},
        "versions": versions(),
        "plan": {
            "towers": totals,
            "kv_groups": [g.describe() for g in plan.kv_groups],
            "dead_kv_not_quantized": [e.name for e in plan.entries if e.dead],
        },
        "calibration": calibration,
        # Wall times vary run to run; the manifest keeps only what the inputs determine.
        "quantization": {
            str(layer): {k: v for k, v in entry.items() if k != "seconds"} if isinstance(entry, dict) else entry
            for layer, entry in quantization_report.items()
        },
        "kv_cache_scales": {str(k): list(v) for k, v in kv_scales.items()},
        "artifacts": files,
        "notes": notes,
    }
