"""Evaluate artifacts end to end: KL base of the reference (once), then quality, latency and
tower checks per artifact, one results file each.

The token ids come from the KL base file, which was tokenized once with the reference folder's
tokenizer: every backend and every artifact sees exactly the same ids.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval import kl as klmod
from eval.backends import artifact_kind, default_backend, open_backend
from eval.device import TegrastatsSampler, device_label, fingerprint
from eval.errors import EvalError
from eval.heldout import heldout_text_sha256, heldout_windows
from eval.latency import DEFAULT_DECODE, DEFAULT_PROMPT_LENGTHS, measure
from eval.results import SCHEMA_VERSION, sha256_of, size_on_disk, slug, write_result
from eval.windows import Windows, perplexity, scored_logits

log = logging.getLogger(__name__)


@dataclass
class RunSettings:
    seq_len: int = 512
    n_windows: int = 4
    kl_top_k: int = klmod.DEFAULT_TOP_K
    threads: int | None = None
    device: str = "cpu"
    latency: bool = False
    prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS
    n_decode: int = DEFAULT_DECODE
    repeats: int = 3
    warmup: int = 1
    towers: bool = False
    tegrastats_interval_ms: int = 500
    extra: dict = field(default_factory=dict)


def tokenize_heldout(reference: str | Path, settings: RunSettings) -> Windows:
    """Held-out windows tokenized once with the reference folder's tokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(reference))
    except (OSError, ValueError) as e:
        raise EvalError(f"{reference}: cannot load the reference tokenizer ({e})") from e
    tokens = heldout_windows(tok, settings.n_windows, settings.seq_len)
    return Windows(tokens=tokens, first=settings.seq_len // 2)


def base_key(ref_sha: str, settings: RunSettings) -> str:
    """Names the KL base by everything its numbers depend on."""
    parts = [ref_sha, str(settings.seq_len), str(settings.n_windows), str(settings.kl_top_k), settings.device]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_kl_base(reference: str | Path, settings: RunSettings, ref_sha: str | None = None) -> klmod.KLBase:
    """Evaluate the reference with transformers and keep its top-k log-probs per scored token."""
    reference = Path(reference)
    windows = tokenize_heldout(reference, settings)
    backend = open_backend("transformers", reference, settings.device, settings.threads)
    ids_all, logp_all, rest_all = [], [], []
    try:
        for w in tqdm(windows.tokens, desc="reference logits", unit="window", leave=False):
            lp = klmod.log_softmax(scored_logits(backend.logits(w), windows), backend.vocab_size)
            ids, vals = klmod.topk_rows(lp, settings.kl_top_k)
            ids_all.append(ids)
            logp_all.append(vals)
            rest_all.append(klmod.rest_logmass(lp, ids))
        vocab = backend.vocab_size
    finally:
        backend.close()
    return klmod.KLBase(
        tokens=windows.tokens,
        first=windows.first,
        vocab=vocab,
        top_ids=np.concatenate(ids_all),
        top_logp=np.concatenate(logp_all),
        rest_logp=np.concatenate(rest_all),
        meta={
            "reference": str(reference),
            "reference_sha256": ref_sha or sha256_of(reference),
            "text_sha256": heldout_text_sha256(),
            "seq_len": settings.seq_len,
            "n_windows": windows.n_windows,
            "top_k": settings.kl_top_k,
            "device": settings.device,
        },
    )


def ensure_kl_base(reference: str | Path, settings: RunSettings, out_dir: str | Path,
                   path: str | Path | None = None) -> tuple[klmod.KLBase, Path]:
    """Load the KL base for these settings, or build and save it (``kl-base-*.npz`` in out_dir)."""
    ref_sha = sha256_of(reference)
    if path is None:
        path = Path(out_dir) / f"kl-base-{slug(Path(reference).name)}-{base_key(ref_sha, settings)}.npz"
    path = Path(path)
    if path.exists():
        base = klmod.KLBase.load(path)
        if base.meta.get("reference_sha256") != ref_sha:
            raise EvalError(f"{path}: KL base was made from another reference "
                            f"(sha256 {base.meta.get('reference_sha256', '?')[:12]}, this one {ref_sha[:12]})")
        log.info("using KL base %s", path)
        return base, path
    log.info("building KL base %s", path)
    base = build_kl_base(reference, settings, ref_sha)
    base.save(path)
    return base, path


def quality(backend, base: klmod.KLBase) -> dict:
    """Perplexity and KL statistics of one backend on the base's windows."""
    windows = Windows(tokens=base.tokens, first=base.first)
    per = windows.scored_per_window
    targets = windows.targets()
    nll, kl, top1 = [], [], []
    for i, w in enumerate(tqdm(windows.tokens, desc="quality", unit="window", leave=False)):
        lp = klmod.log_softmax(scored_logits(backend.logits(w), windows), base.vocab)
        rows = slice(i * per, (i + 1) * per)
        nll.append(-lp[np.arange(per), targets[i]].astype(np.float64))
        kl.append(klmod.kl_rows(base.top_ids[rows], base.top_logp[rows], base.rest_logp[rows], lp))
        top1.append(lp.argmax(axis=-1) == base.top_ids[rows, 0])
    out = perplexity(np.concatenate(nll))
    out["kl"] = klmod.kl_summary(np.concatenate(kl), np.concatenate(top1))
    return out


def evaluate(artifact: str | Path, reference: str | Path, out_dir: str | Path, backend_name: str = "auto",
             settings: RunSettings | None = None, base: klmod.KLBase | None = None, name: str | None = None) -> Path:
    """Evaluate one artifact; returns the path of its results file."""
    settings = settings or RunSettings()
    artifact, reference = Path(artifact), Path(reference)
    kind = artifact_kind(artifact)
    backend_name = default_backend(artifact) if backend_name == "auto" else backend_name
    if base is None:
        base, _ = ensure_kl_base(reference, settings, out_dir)
    is_reference = artifact.resolve() == reference.resolve()
    name = name or ("reference" if is_reference else artifact.stem if kind == "gguf" else artifact.name)
    fp = fingerprint(settings.threads)
    n_ctx = max(settings.seq_len, max(settings.prompt_lengths) + settings.n_decode + 1)
    backend = open_backend(backend_name, artifact, settings.device, settings.threads, n_ctx=n_ctx)
    try:
        fp["cpu"]["threads"] = backend.threads
        log.info("%s: quality on %d windows of %d tokens", name, base.tokens.shape[0], base.tokens.shape[1])
        q = quality(backend, base)
        lat = None
        if settings.latency:
            stream = base.tokens[:, 1:].reshape(-1)  # held-out ids without the <bos> of each window
            with TegrastatsSampler(settings.tegrastats_interval_ms) as sampler:
                lat = measure(backend, stream, int(base.tokens[0, 0]), settings.prompt_lengths,
                              settings.n_decode, settings.repeats, settings.warmup)
            lat["tegrastats"] = sampler.summary()
        towers = None
        if settings.towers:
            from eval.towers import tower_check

            towers = tower_check(backend, reference, out_dir, settings)
    finally:
        backend.close()
    result = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "is_reference": is_reference,
        "artifact": {"path": str(artifact), "kind": kind, "size_bytes": size_on_disk(artifact),
                     "sha256": sha256_of(artifact)},
        "reference": {"path": str(reference), "sha256": base.meta.get("reference_sha256")},
        "backend": backend_name,
        "device": {"kind": settings.device, "label": device_label(fp, settings.device), "fingerprint": fp},
        "settings": {"seq_len": int(base.tokens.shape[1]), "n_windows": int(base.tokens.shape[0]),
                     "kl_top_k": base.top_k, "vocab": base.vocab, "threads": backend.threads,
                     "text_sha256": base.meta.get("text_sha256"), **settings.extra},
        "quality": q,
        "latency": lat,
        "towers": towers,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = write_result(result, out_dir)
    log.info("%s: ppl %.3f, KL mean %.5f, top-1 %.3f -> %s", name, q["ppl"], q["kl"]["mean"], q["kl"]["top1"], path)
    return path


def evaluate_many(artifacts, reference, out_dir, backend_name="auto", settings: RunSettings | None = None,
                  kl_base_path: str | Path | None = None) -> list[Path]:
    settings = settings or RunSettings()
    for a in artifacts:  # fail on a bad path before the reference's (slow) KL base is built
        artifact_kind(a)
    if artifact_kind(reference) != "safetensors":
        raise EvalError(f"{reference}: --reference must be the unquantized model folder (with config.json)")
    base, _ = ensure_kl_base(reference, settings, out_dir, kl_base_path)
    return [evaluate(a, reference, out_dir, backend_name, settings, base) for a in artifacts]


def describe(result_path: str | Path) -> str:
    r = json.loads(Path(result_path).read_text())
    q = r["quality"]
    return f"{r['name']}: ppl {q['ppl']:.4f}  KL {q['kl']['mean']:.6f} (p99 {q['kl']['p99']:.5f}, top-1 {q['kl']['top1']:.3f})"
