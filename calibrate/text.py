"""Text calibration samples: documents from a source, tokenized and cut into seeded windows.

Every sample starts with the tokenizer's ``<bos>``. With ``chat_template`` a sample is exactly
``tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)``
for a ``text`` cut from a document, sized so that the whole sample is ``seq_len`` tokens (or a
few fewer where re-tokenizing the cut text cannot reach it exactly).

Each sample is recorded as the document spans it came from (document id, token offset, token
count) and the sha256 of its token ids (``ids_sha256``).
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calibrate import embedded_text
from calibrate.config import TextCalibration
from calibrate.errors import CalibrationError
from calibrate.sources import (
    check_column,
    file_sha256,
    hub_manifest,
    list_files,
    load_hub_split,
)

log = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet", ".csv")
# Packing tokenizes documents (in seeded order) until it holds this many times the tokens it
# needs, then draws windows from all of them: diverse samples without tokenizing a whole corpus.
OVERSAMPLE = 16


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class TextSample:
    input_ids: list[int]
    # (document id, first token, token count); with packing a count may run into the separator
    # (<eos>, or "\n\n" for chat samples) that follows the document in the packed stream.
    spans: tuple[tuple[str, int, int], ...]

    def manifest(self) -> dict:
        return {"sha256": ids_sha256(self.input_ids), "n_tokens": len(self.input_ids), "spans": [list(s) for s in self.spans]}


def ids_sha256(ids: Sequence[int]) -> str:
    """sha256 of token ids as little-endian int64: the id of a sample in manifests."""
    import hashlib

    return hashlib.sha256(np.asarray(list(ids), dtype="<i8").tobytes()).hexdigest()


# --------------------------------------------------------------------------- documents


def load_documents(src: TextCalibration) -> tuple[list[Document], dict]:
    """Documents of a text source (non-empty ones, in a stable order) and the source's manifest."""
    label = src.describe()
    if src.source == "embedded":
        split = src.resolved_split
        docs = [Document(d.id, d.text) for d in embedded_text.split_documents(split)]
        manifest = {"source": "embedded", "corpus": "python pydoc topics + stdlib sources", "split": split,
                    "corpus_sha256": embedded_text.corpus_hash(), "documents": [d.id for d in docs]}
    elif src.source == "files":
        files = list_files(src.path, TEXT_EXTENSIONS, label)
        root = Path(src.path).expanduser()
        docs = []
        for f in files:
            # Ids relative to a folder keep same-named files in subfolders apart.
            name = str(f.relative_to(root)) if root.is_dir() else f.name
            docs.extend(_file_documents(f, name, src.resolved_column, label))
        manifest = {"source": "files", "path": src.path, "column": src.resolved_column,
                    "files": [{"path": str(f), "sha256": file_sha256(f)} for f in files]}
    else:
        split, column = src.resolved_split, src.resolved_column
        ds = load_hub_split(src.dataset, src.name, split, label, src.data_files)
        check_column(ds, column, label)
        docs = []
        for i, value in enumerate(ds[column]):
            if value is not None and not isinstance(value, str):
                raise CalibrationError(label, f"column {column!r} row {i} holds {type(value).__name__}, not text")
            docs.append(Document(f"row:{i}", value or ""))
        manifest = {"source": "hub", **hub_manifest(ds, src.dataset, src.name, split, column, src.data_files)}
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CalibrationError(label, "holds no non-empty text documents")
    return docs, manifest


def _file_documents(path: Path, name: str, column: str, label: str) -> list[Document]:
    """One document per .txt file, per .jsonl line, per parquet/csv row; ids start with ``name``."""
    where = f"{label}: {path}"
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return [Document(name, path.read_text(encoding="utf-8"))]
        if suffix == ".jsonl":
            docs = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(where, f"line {n} is not JSON ({e.msg})") from None
                if not isinstance(obj, Mapping) or column not in obj:
                    keys = ", ".join(obj) if isinstance(obj, Mapping) else type(obj).__name__
                    raise CalibrationError(where, f"line {n} has no key {column!r} (keys: {keys}); set 'column'")
                docs.append(Document(f"{name}:{n}", _as_text(obj[column], where, f"line {n}")))
            return docs
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
    except CalibrationError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CalibrationError(where, f"cannot be read as {suffix} ({type(e).__name__}: {e})") from None
    if column not in table.column_names:
        raise CalibrationError(where, f"has no column {column!r}; columns: {', '.join(table.column_names)}")
    return [Document(f"{name}:{i}", _as_text(v, where, f"row {i}")) for i, v in enumerate(table.column(column).to_pylist())]


def _as_text(value, where: str, at: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CalibrationError(where, f"{at} holds {type(value).__name__}, not text")
    return value


# --------------------------------------------------------------------------- tokens


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_ids(tokenizer, content: str) -> list[int]:
    """Token ids of one user turn holding ``content``, as the model's own chat template renders it."""
    out = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True)
    ids = out["input_ids"] if isinstance(out, Mapping) else out
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def _bos(tokenizer, label: str) -> int:
    if tokenizer.bos_token_id is None:
        raise CalibrationError(label, "the tokenizer has no <bos> token; Gemma tokenizers do")
    return int(tokenizer.bos_token_id)


def _chat_sample(tokenizer, stream: list[int], start: int, budget: int, seq_len: int, label: str) -> tuple[list[int], int, int]:
    """Chat-wrapped ids of ``stream[s:s+n]``, with s >= start and n chosen so the result has ``seq_len`` tokens.

    Decoding a window and re-tokenizing it (the template trims whitespace, merges cross the cut)
    can shift its length by a token or two, so try a few cut lengths and starts and keep the
    longest result that fits. Returns (ids, s, n).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise CalibrationError(label, "chat_template: true, but the tokenizer has no chat template")
    best = None  # (ids, s, n)
    tried: set[tuple[int, int]] = set()

    def attempt(s: int, k: int):
        nonlocal best
        k = max(1, min(k, len(stream) - s))
        if (s, k) in tried or s >= len(stream):
            return None
        tried.add((s, k))
        ids = chat_ids(tokenizer, tokenizer.decode(stream[s : s + k]))
        if len(ids) <= seq_len and (best is None or len(ids) > len(best[0])):
            best = (ids, s, k)
        return ids

    for shift in range(4):
        s, n = start + shift, budget
        for _ in range(6):
            ids = attempt(s, n)
            if ids is None or len(ids) == seq_len:
                break
            n += seq_len - len(ids)
        if best is not None and len(best[0]) < seq_len:
            for k in range(best[2] + 1, best[2] + 4):
                attempt(best[1], k)
        if best is not None and len(best[0]) == seq_len:
            break
    if best is None:
        raise CalibrationError(label, f"seq_len {seq_len} is too short to hold the chat template and any text")
    return best


def sample_text(src: TextCalibration, documents: list[Document], tokenizer, seed: int) -> list[TextSample]:
    """``src.n_samples`` windows of ``src.seq_len`` tokens, deterministic for ``seed``."""
    label = src.describe()
    rng = random.Random(seed)
    seq_len = src.seq_len
    bos = _bos(tokenizer, label)
    if src.chat_template:
        overhead = len(chat_ids(tokenizer, ""))
        budget = seq_len - overhead
        if budget < 1:
            raise CalibrationError(label, f"seq_len {seq_len} cannot hold the chat template ({overhead} tokens) and any text")
    else:
        budget = seq_len - 1  # room after <bos>
    order = list(range(len(documents)))
    rng.shuffle(order)
    samples = _packed(src, documents, order, tokenizer, rng, budget, label) if src.packing else \
        _per_document(src, documents, order, tokenizer, rng, budget, label)

    out = []
    for stream, start, spans in samples:
        if src.chat_template:
            ids, s, used = _chat_sample(tokenizer, stream, start, budget, seq_len, label)
            spans = _clip_spans(spans, s - start, used)
        else:
            ids = [bos] + stream[start : start + budget]
        out.append(TextSample(ids, tuple(spans)))
    log.info("%s: %d samples of %d tokens", label, len(out), seq_len)
    return out


def _clip_spans(spans, skip: int, n_tokens: int):
    """The spans of a window that starts ``skip`` tokens later and holds ``n_tokens``."""
    out, left = [], n_tokens
    for doc, first, count in spans:
        drop = min(skip, count)
        skip -= drop
        first, count = first + drop, count - drop
        if count <= 0:
            continue
        if left <= 0:
            break
        out.append((doc, first, min(count, left)))
        left -= count
    return out


def _progress(order, label):
    """Progress over documents, shown only where tokenizing is long enough to wait for."""
    return tqdm(order, desc=f"tokenizing {label}", unit="doc", leave=False, disable=len(order) < 500)


def _packed(src, documents, order, tokenizer, rng, budget, label):
    """Concatenate documents (separated by <eos>) and draw non-overlapping windows at random."""
    n = src.n_samples
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not src.chat_template else _encode(tokenizer, "\n\n")
    stream: list[int] = []
    starts: list[tuple[int, str]] = []  # (stream offset, document id)
    # Chat samples may read a few tokens past their window while fitting the template.
    slack = 8 if src.chat_template else 0
    for i in _progress(order, label):
        starts.append((len(stream), documents[i].id))
        stream.extend(_encode(tokenizer, documents[i].text))
        stream.extend(sep)
        if len(stream) >= OVERSAMPLE * n * (budget + slack):
            break
    n_windows = (len(stream) - slack) // (budget + slack) if len(stream) > slack else 0
    if n_windows < n:
        raise CalibrationError(
            label,
            f"too few tokens: {len(stream)} tokens in {len(starts)} documents, but n_samples x seq_len needs "
            f"{n} windows of {budget} text tokens ({n * budget} tokens); lower n_samples or seq_len, or add data",
        )
    chosen = sorted(rng.sample(range(n_windows), n))
    offsets = [s for s, _ in starts] + [len(stream)]
    out = []
    for w in chosen:
        a = w * (budget + slack)
        b = a + budget + slack
        spans = []
        for k, (s, doc_id) in enumerate(starts):
            e = offsets[k + 1]
            if e <= a or s >= b:
                continue
            lo = max(a, s)
            spans.append((doc_id, lo - s, min(b, e) - lo))
        out.append((stream, a, spans))
    return out


def _per_document(src, documents, order, tokenizer, rng, budget, label):
    """One window per document, at a seeded offset, from documents long enough to hold it."""
    n = src.n_samples
    need = budget + (8 if src.chat_template else 0)
    out = []
    for i in _progress(order, label):
        ids = _encode(tokenizer, documents[i].text)
        if len(ids) < need:
            continue
        start = rng.randrange(0, len(ids) - need + 1)
        out.append((ids, start, [(documents[i].id, start, need)]))
        if len(out) == n:
            return out
    raise CalibrationError(
        label,
        f"too few tokens: only {len(out)} of {len(documents)} documents hold {need} tokens, but "
        f"n_samples is {n} (one window per document with packing: false); use packing: true, "
        f"or lower n_samples or seq_len",
    )


# --------------------------------------------------------------------------- held-out


def heldout_windows(tokenizer, n_windows: int, seq_len: int) -> list[list[int]]:
    """Consecutive ``seq_len`` windows (``<bos>`` first) of the embedded ``eval`` split, in id order.

    No seed: evaluation reads the same tokens every run. The ``eval`` split shares no document
    with ``calib`` (calibration) or ``train`` (the tiny model's training text).
    """
    label = "held-out text (embedded, split eval)"
    bos = _bos(tokenizer, label)
    if seq_len < 2:
        raise CalibrationError(label, f"seq_len must be at least 2, got {seq_len}")
    body = seq_len - 1
    stream: list[int] = []
    for doc in embedded_text.split_documents("eval"):
        stream.extend(_encode(tokenizer, doc.text))
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= n_windows * body:
            break
    if len(stream) < n_windows * body:
        raise CalibrationError(label, f"too few tokens: {len(stream)}, but {n_windows} windows x {seq_len} need {n_windows * body}")
    return [[bos] + stream[k * body : (k + 1) * body] for k in range(n_windows)]
