"""Evaluation data: text windows from a chosen source, and held-out images and audio.

Text comes from one of the sources calibration reads (``calibrate.text.load_documents``: a local
file, folder or glob of .txt/.jsonl/.parquet/.csv, or a ``datasets`` split), or by default from
the embedded corpus's ``eval`` split (never trained on, never calibrated on). The documents are
tokenized in order, separated by ``<eos>``, and cut into consecutive windows, each ``<bos>``
followed by ``seq_len - 1`` tokens: the same windows ``calibrate.heldout_text`` gives for the
embedded split. ``text_sha256`` identifies the text: the sha256 of the documents' UTF-8 text
joined by NUL bytes (for a single .txt file, the sha256 of the file).
Images: scikit-image photographs of the ``eval`` split. Audio: the ``eval`` speech clips.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from calibrate.config import TEXT_SOURCE_KEYS, TextCalibration, source_error
from eval.errors import EvalError

TEXT_SOURCES = ("embedded", "files", "hub")


@dataclass(frozen=True)
class TextSource:
    """Where the evaluation text comes from (``embedded``: the held-out split)."""

    source: str = "embedded"
    path: str | None = None  # files: a file, a folder or a glob
    dataset: str | None = None  # hub: datasets id or a local dataset folder
    name: str | None = None  # hub: datasets config
    split: str | None = None  # hub: default "test"
    column: str | None = None  # hub, and jsonl/parquet/csv files: default "text"

    def __post_init__(self):
        if self.source not in TEXT_SOURCES:
            raise EvalError(f"text source {self.source!r} is unknown; valid: {', '.join(TEXT_SOURCES)}")
        error = source_error(self, TEXT_SOURCE_KEYS)
        if error:
            raise EvalError(f"text {error}")
        if self.source == "embedded" and self.split not in (None, "eval"):
            raise EvalError("the embedded text has only its held-out split 'eval'; give a path or a dataset for other text")

    def describe(self) -> str:
        if self.source == "embedded":
            return "embedded held-out text (split eval)"
        if self.source == "files":
            return f"text files {self.path}"
        cfg = f", config {self.name}" if self.name else ""
        return f"dataset {self.dataset}{cfg}, split {self.split or 'test'}"


class _EvalText(TextCalibration):
    """calibrate's text source, whose errors name the eval text instead of a recipe section."""

    section: ClassVar[str] = "eval text"


def _calibration_source(src: TextSource) -> _EvalText:
    hub = src.source == "hub"
    return _EvalText(source=src.source, path=src.path, dataset=src.dataset, name=src.name,
                    split=(src.split or "test") if hub else None, column=src.column)


def load_text(src: TextSource) -> tuple[list[str], dict]:
    """The source's documents (non-empty, in order) and what identifies them, ``text_sha256`` included."""
    import calibrate

    if src.source == "embedded":
        from calibrate import embedded_text

        texts = [d.text for d in embedded_text.split_documents("eval")]
        meta = {"source": "embedded", "split": "eval", "corpus_sha256": embedded_text.corpus_hash()}
    else:
        from calibrate.text import load_documents

        try:
            docs, meta = load_documents(_calibration_source(src))
        except calibrate.CalibrationError as e:
            raise EvalError(str(e)) from e
        texts = [d.text for d in docs]
    h = hashlib.sha256("\0".join(texts).encode("utf-8"))
    return texts, {**meta, "documents": len(texts), "text_sha256": h.hexdigest()}


def text_windows(tokenizer, texts: list[str], n_windows: int, seq_len: int, label: str) -> np.ndarray:
    """(n_windows, seq_len) int32 token ids: ``<bos>`` then consecutive tokens of the documents."""
    if n_windows < 1 or seq_len < 4:
        raise EvalError(f"need --n-windows >= 1 and --seq-len >= 4, got {n_windows} and {seq_len}")
    if tokenizer.bos_token_id is None:
        raise EvalError(f"{label}: the reference tokenizer has no <bos> token; Gemma tokenizers do")
    body = seq_len - 1
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= n_windows * body:
            break
    if len(stream) < n_windows * body:
        raise EvalError(f"{label}: too few tokens: {len(stream)}, but {n_windows} windows of {seq_len} need "
                        f"{n_windows * body}; lower --n-windows or --seq-len, or give more text")
    rows = [[tokenizer.bos_token_id] + stream[k * body:(k + 1) * body] for k in range(n_windows)]
    return np.asarray(rows, dtype=np.int32)


def heldout_images() -> list:
    """RGB PIL images."""
    import calibrate

    return calibrate.heldout_images()


def heldout_audio() -> list[tuple[np.ndarray, int]]:
    """(float32 mono waveform, sampling rate) pairs."""
    import calibrate

    return calibrate.heldout_audio()
