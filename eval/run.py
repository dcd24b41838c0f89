"""Evaluate artifacts end to end: windows of the evaluation text (tokenized once), the KL base
of the reference (once, when KL is asked), then quality, latency and tower checks per artifact,
one results file each.

The token ids come from the KL base file (or, without KL, from one tokenization with the
reference folder's tokenizer): every backend and every artifact sees exactly the same ids.
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
from eval.backends import artifact_kind, default_backend, device_kind, open_backend
from eval.device import TegrastatsSampler, device_label, fingerprint
from eval.errors import EvalError
from eval.heldout import TextSource, load_text, text_windows
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
    device: str = "cpu"  # cpu, cuda or cuda:N
    perplexity: bool = True
    kl: bool = True  # False: no reference forward, no KL base
    latency: bool = False
    prompt_lengths: tuple[int, ...] = DEFAULT_PROMPT_LENGTHS
    n_decode: int = DEFAULT_DECODE
    repeats: int = 3
    warmup: int = 1
    towers: bool = False
    text: TextSource = field(default_factory=TextSource)
    tegrastats_interval_ms: int = 500
    extra: dict = field(default_factory=dict)


@dataclass
class Inputs:
    """What every artifact is evaluated on: the windows, the KL base (when KL is asked) and the
    text they were cut from."""

    windows: Windows
    base: klmod.KLBase | None
    text: dict
    reference_sha256: str | None

    @classmethod
    def of_base(cls, base: klmod.KLBase) -> "Inputs":
        return cls(Windows(tokens=base.tokens, first=base.first), base, base.meta.get("text") or {},
                   base.meta.get("reference_sha256"))


def tokenize_heldout(reference: str | Path, settings: RunSettings, texts: list[str] | None = None) -> Windows:
    """Windows of the settings' evaluation text (``texts``: its documents, when already loaded),
    tokenized once with the reference folder's tokenizer."""
    from transformers import AutoTokenizer

    if texts is None:
        texts, _ = load_text(settings.text)
    try:
        tok = AutoTokenizer.from_pretrained(str(reference))
    except (OSError, ValueError) as e:
        raise EvalError(f"{reference}: cannot load the reference tokenizer ({e})") from e
    tokens = text_windows(tok, texts, settings.n_windows, settings.seq_len, settings.text.describe())
    return Windows(tokens=tokens, first=settings.seq_len // 2)


def base_key(ref_sha: str, text_sha: str, settings: RunSettings) -> str:
    """Names the KL base by everything its numbers depend on (a different text gets another base)."""
    parts = [ref_sha, text_sha, str(settings.seq_len), str(settings.n_windows), str(settings.kl_top_k), settings.device]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def build_kl_base(reference: str | Path, settings: RunSettings, ref_sha: str | None = None,
                  text: tuple[list[str], dict] | None = None) -> klmod.KLBase:
    """Evaluate the reference with transformers and keep its top-k log-probs per scored token."""
    reference = Path(reference)
    texts, text_meta = text or load_text(settings.text)
    windows = tokenize_heldout(reference, settings, texts)
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
            "text_sha256": text_meta["text_sha256"],
            "text": text_meta,
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
    text = load_text(settings.text)
    text_sha = text[1]["text_sha256"]
    if path is None:
        path = Path(out_dir) / f"kl-base-{slug(Path(reference).name)}-{base_key(ref_sha, text_sha, settings)}.npz"
    path = Path(path)
    if path.exists():
        base = klmod.KLBase.load(path)
        if base.meta.get("reference_sha256") != ref_sha:
            raise EvalError(f"{path}: KL base was made from another reference "
                            f"(sha256 {base.meta.get('reference_sha256', '?')[:12]}, this one {ref_sha[:12]})")
        if base.meta.get("text_sha256") != text_sha:
            raise EvalError(f"{path}: KL base was made on another text (sha256 {str(base.meta.get('text_sha256'))[:12]}, "
                            f"{settings.text.describe()} has {text_sha[:12]}); drop --kl-base to build one for this text")
        log.info("using KL base %s", path)
        return base, path
    log.info("building KL base %s", path)
    base = build_kl_base(reference, settings, ref_sha, text)
    base.save(path)
    return base, path


def prepare_inputs(reference: str | Path, settings: RunSettings, out_dir: str | Path,
                   kl_base_path: str | Path | None = None) -> Inputs:
    """The windows every artifact sees: from the KL base when KL is asked, else tokenized here."""
    if settings.kl:
        base, _ = ensure_kl_base(reference, settings, out_dir, kl_base_path)
        return Inputs.of_base(base)
    if kl_base_path is not None:
        raise EvalError("--kl-base given, but KL is not computed")
    texts, meta = load_text(settings.text)
    return Inputs(tokenize_heldout(reference, settings, texts), None, meta, sha256_of(reference))


def quality(backend, base: klmod.KLBase | Inputs, ppl: bool = True) -> dict | None:
    """Perplexity (when ``ppl``) and KL statistics (when the inputs have a KL base) of one backend."""
    inputs = base if isinstance(base, Inputs) else Inputs.of_base(base)
    windows, kb = inputs.windows, inputs.base
    if not ppl and kb is None:
        return None
    vocab = kb.vocab if kb is not None else backend.vocab_size
    per = windows.scored_per_window
    targets = windows.targets()
    nll, kl, top1 = [], [], []
    for i, w in enumerate(tqdm(windows.tokens, desc="quality", unit="window", leave=False)):
        lp = klmod.log_softmax(scored_logits(backend.logits(w), windows), vocab)
        nll.append(-lp[np.arange(per), targets[i]].astype(np.float64))
        if kb is not None:
            rows = slice(i * per, (i + 1) * per)
            kl.append(klmod.kl_rows(kb.top_ids[rows], kb.top_logp[rows], kb.rest_logp[rows], lp))
            top1.append(lp.argmax(axis=-1) == kb.top_ids[rows, 0])
    out = perplexity(np.concatenate(nll)) if ppl else {}
    if kb is not None:
        out["kl"] = klmod.kl_summary(np.concatenate(kl), np.concatenate(top1), [float(k.mean()) for k in kl])
    return out


def _fingerprint(settings: RunSettings) -> dict:
    fp = fingerprint(settings.threads)
    if settings.device.startswith("cuda:") and "cuda" in fp:
        import torch

        from eval.device import cuda_fingerprint

        with torch.cuda.device(int(settings.device.split(":")[1])):  # the GPU asked for, not the current one
            fp["cuda"] = cuda_fingerprint()
    return fp


def evaluate(artifact: str | Path, reference: str | Path, out_dir: str | Path, backend_name: str = "auto",
             settings: RunSettings | None = None, base: klmod.KLBase | Inputs | None = None, name: str | None = None,
             recorded_path: str | Path | None = None) -> Path:
    """Evaluate one artifact; returns the path of its results file.

    ``base``: the KL base, or ``Inputs`` shared by several artifacts (None: prepared here).
    ``recorded_path``: the path the results record (and are named by) instead of the artifact's
    absolute path: ``quantize run`` evaluates in its temporary folder before renaming it into
    place, and records its artifacts relative to the results folder (``../NAME.gguf``).
    """
    settings = settings or RunSettings()
    artifact, reference = Path(artifact), Path(reference)
    kind = artifact_kind(artifact)
    backend_name = default_backend(artifact) if backend_name == "auto" else backend_name
    inputs = prepare_inputs(reference, settings, out_dir) if base is None else \
        base if isinstance(base, Inputs) else Inputs.of_base(base)
    windows = inputs.windows
    is_reference = artifact.resolve() == reference.resolve()
    name = name or ("reference" if is_reference else artifact.stem if kind == "gguf" else artifact.name)
    fp = _fingerprint(settings)
    n_ctx = max(settings.seq_len, max(settings.prompt_lengths) + settings.n_decode + 1)
    backend = open_backend(backend_name, artifact, settings.device, settings.threads, n_ctx=n_ctx)
    try:
        fp["cpu"]["threads"] = backend.threads
        log.info("%s: quality on %d windows of %d tokens", name, windows.n_windows, windows.n_ctx)
        q = quality(backend, inputs, settings.perplexity)
        lat = None
        if settings.latency:
            stream = windows.tokens[:, 1:].reshape(-1)  # evaluation ids without the <bos> of each window
            with TegrastatsSampler(settings.tegrastats_interval_ms) as sampler:
                lat = measure(backend, stream, int(windows.tokens[0, 0]), settings.prompt_lengths,
                              settings.n_decode, settings.repeats, settings.warmup)
            lat["tegrastats"] = sampler.summary()
        towers = None
        if settings.towers:
            from eval.towers import tower_check

            towers = tower_check(backend, reference, out_dir, settings)
        vocab = inputs.base.vocab if inputs.base is not None else backend.vocab_size
    finally:
        backend.close()
    shown = Path(recorded_path) if recorded_path is not None else artifact.resolve()
    text = inputs.text
    result = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "is_reference": is_reference,
        "artifact": {"path": str(shown), "kind": kind, "size_bytes": size_on_disk(artifact),
                     "sha256": sha256_of(artifact)},
        "reference": {"path": str(reference), "sha256": inputs.reference_sha256},
        "backend": backend_name,
        "device": {"kind": settings.device, "label": device_label(fp, device_kind(settings.device)), "fingerprint": fp},
        "settings": {"seq_len": windows.n_ctx, "n_windows": windows.n_windows,
                     "kl_top_k": inputs.base.top_k if inputs.base is not None else None, "vocab": vocab,
                     "threads": backend.threads, "text_sha256": text.get("text_sha256"), **settings.extra},
        "text": text,
        "quality": q,
        "latency": lat,
        "towers": towers,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = write_result(result, out_dir)
    log.info("%s -> %s", describe_result(result), path)
    return path


def evaluate_many(artifacts, reference, out_dir, backend_name="auto", settings: RunSettings | None = None,
                  kl_base_path: str | Path | None = None, recorded_paths=None) -> list[Path]:
    """Evaluate each artifact against ``reference`` (a model folder) on the same inputs.

    ``recorded_paths``: one per artifact, or None (see ``evaluate``).
    """
    settings = settings or RunSettings()
    for a in artifacts:  # fail on a bad path before the reference's (slow) KL base is built
        artifact_kind(a)
    if artifact_kind(reference) != "safetensors":
        raise EvalError(f"{reference}: --reference must be the unquantized model folder (with config.json)")
    recorded_paths = list(recorded_paths) if recorded_paths is not None else [None] * len(artifacts)
    if len(recorded_paths) != len(artifacts):
        raise EvalError(f"{len(recorded_paths)} recorded paths for {len(artifacts)} artifacts")
    inputs = prepare_inputs(reference, settings, out_dir, kl_base_path)
    have = inputs.windows.n_windows * (inputs.windows.n_ctx - 1)
    if settings.latency and have < max(settings.prompt_lengths):  # before any artifact is loaded
        raise EvalError(f"--latency: prompts of up to {max(settings.prompt_lengths)} tokens, but the windows hold "
                        f"{have} tokens of text; raise --n-windows or --seq-len, or lower --prompt-lengths")
    return [evaluate(a, reference, out_dir, backend_name, settings, inputs, recorded_path=r)
            for a, r in zip(artifacts, recorded_paths)]


def describe_result(r: dict) -> str:
    """One line: the name and whatever quality numbers the result holds."""
    q = r.get("quality") or {}
    parts = [r["name"] + ":"]
    if "ppl" in q:
        parts.append(f"ppl {q['ppl']:.4f}")
    if "kl" in q:
        parts.append(f"KL {q['kl']['mean']:.6f} (p99 {q['kl']['p99']:.5f}, top-1 {q['kl']['top1']:.3f})")
    if r.get("latency"):
        last = r["latency"]["runs"][-1]
        parts.append(f"decode {last['decode_tok_s']:.1f} tok/s")
    return "  ".join(parts)


def describe(result_path: str | Path) -> str:
    return describe_result(json.loads(Path(result_path).read_text()))
