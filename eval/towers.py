"""Vision and audio tower checks: cosine similarity of an artifact's tower embeddings (after
the multimodal projection into the text model's space) to the reference's, on held-out images
and speech clips.

The reference's embeddings are computed once per device and kept next to the KL base
(``towers-*.npz``). Only the transformers backend runs towers here: llama.cpp has no Gemma 3n
audio encoder, and its vision projector does not load for Gemma 3n yet (see
/work/shared/gemma3n-notes.md), so GGUF results record why the check was skipped.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from eval.heldout import heldout_audio, heldout_images
from eval.results import sha256_of, slug
from eval.atomic_file import atomic_path

log = logging.getLogger(__name__)


def _inputs(reference: Path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(reference))
    images = heldout_images()
    clips = heldout_audio()
    pixels = [processor.image_processor([im], return_tensors="pt")["pixel_values"] for im in images]
    feats = []
    for wave, rate in clips:
        f = processor.feature_extractor([wave], sampling_rate=rate, return_tensors="pt")
        feats.append((f["input_features"], f["input_features_mask"]))
    return pixels, feats


@torch.inference_mode()
def embeddings(model, device, pixels, feats) -> dict[str, list[np.ndarray]]:
    """Projected tower outputs per input (one forward per item: no padding in the comparison)."""
    dtype = next(model.parameters()).dtype
    # Gemma3nForConditionalGeneration exposes get_image_features itself but keeps
    # get_audio_features on its inner Gemma3nModel; the inner model has both.
    model = getattr(model, "model", model)
    out = {"vision": [], "audio": []}
    for pv in pixels:
        emb = model.get_image_features(pixel_values=pv.to(device, dtype)).pooler_output
        out["vision"].append(emb[0].float().cpu().numpy())
    for f, m in feats:
        # the tower takes the padding mask, as the model's own forward passes ~input_features_mask
        emb = model.get_audio_features(f.to(device, dtype), ~m.to(device).bool()).pooler_output
        out["audio"].append(emb[0].float().cpu().numpy())
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den else 0.0


def _reference_embeddings(reference: Path, out_dir: Path, device: str, pixels, feats) -> dict[str, list[np.ndarray]]:
    key = hashlib.sha256(f"{sha256_of(reference)}|{device}".encode()).hexdigest()[:16]
    path = out_dir / f"towers-{slug(reference.name)}-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return {t: [z[k] for k in sorted((k for k in z.files if k.startswith(t + "_")), key=lambda s: int(s.split("_")[1]))]
                    for t in ("vision", "audio")}
    from eval.backends.hf import TransformersBackend

    ref = TransformersBackend(reference, device=device)
    try:
        embs = embeddings(ref.model, ref.device, pixels, feats)
    finally:
        ref.close()
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **{f"{t}_{i}": e for t, es in embs.items() for i, e in enumerate(es)})
    return embs


def tower_check(backend, reference: str | Path, out_dir: str | Path, settings) -> dict:
    """{"vision": {...}, "audio": {...}} cosine statistics, or {"skipped": reason}."""
    if backend.name != "transformers":
        return {"skipped": f"tower checks need the transformers backend (this is {backend.name})"}
    model = backend.model
    inner = getattr(model, "model", model)
    if not hasattr(inner, "get_image_features") or not hasattr(inner, "get_audio_features"):
        return {"skipped": f"{type(model).__name__} has no vision/audio towers"}
    reference = Path(reference)
    pixels, feats = _inputs(reference)
    ref = _reference_embeddings(reference, Path(out_dir), settings.device, pixels, feats)
    mine = embeddings(model, backend.device, pixels, feats)
    out = {}
    for tower in ("vision", "audio"):
        cos = [cosine(a, b) for a, b in zip(ref[tower], mine[tower])]
        if cos:
            out[tower] = {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos)), "n": len(cos)}
    return out
