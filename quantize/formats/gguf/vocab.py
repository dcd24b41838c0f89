"""Gemma 3n's vocabulary for llama.cpp: SentencePiece pieces with scores and token types.

Follows llama.cpp's converter (``_create_vocab_sentencepiece`` as ``Gemma3NModel.set_vocab``
calls it, with the full ``vocab_size`` rather than ``vocab_size_per_layer_input``): ids below the
SentencePiece size take piece, score and type from ``tokenizer.model``; the multimodal slots
above it (``<end_of_image>``, ``<image_soft_token>``, ... in ``tokenizer.json``'s added tokens)
become CONTROL tokens (or USER_DEFINED when not special) with score -1000; any id still unnamed
is ``[PADn]`` / UNUSED. The tokenizer model is ``llama`` (SentencePiece) with no space prefix.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import SpecialVocab, TokenType

from quantize.errors import ExportError


@dataclass(frozen=True)
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    special: SpecialVocab


def _added_tokens(folder: Path) -> list[dict]:
    out: list[dict] = []
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            out += json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", [])
        except json.JSONDecodeError as e:
            raise ExportError(f"{tj}: not valid JSON ({e})") from None
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        try:
            dec = json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) or {}
        except json.JSONDecodeError as e:
            raise ExportError(f"{tc}: not valid JSON ({e})") from None
        out += [{"id": int(k), **v} for k, v in dec.items()]
    return out


def load_vocab(folder: str | Path, vocab_size: int) -> Vocab:
    folder = Path(folder)
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise ExportError(f"{folder}: no tokenizer.model; the GGUF needs Gemma's SentencePiece model")
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:  # pragma: no cover - sentencepiece is a dependency of the project
        raise ExportError("the GGUF export needs the 'sentencepiece' package to read tokenizer.model") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    n_sp = sp.vocab_size()
    if n_sp > vocab_size:
        raise ExportError(f"{path}: {n_sp} pieces but text_config.vocab_size is {vocab_size}")

    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i in range(n_sp):
        if sp.IsUnknown(i):
            t = TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = TokenType.CONTROL
        elif sp.IsUnused(i):
            t = TokenType.UNUSED
        elif sp.IsByte(i):
            t = TokenType.BYTE
        else:
            t = TokenType.NORMAL
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = float(sp.GetScore(i))
        types[i] = int(t)

    for tok in _added_tokens(folder):
        i = int(tok["id"])
        if i >= vocab_size:
            raise ExportError(f"{folder}: added token {tok.get('content')!r} has id {i} >= vocab_size {vocab_size}")
        content = tok["content"]
        if tok.get("special", False):
            types[i] = int(TokenType.CONTROL)
        else:
            content = content.replace("\u2581", " ")  # llama.cpp pre-normalises user-defined spaces
            types[i] = int(TokenType.USER_DEFINED)
        tokens[i] = content.encode("utf-8")
        scores[i] = -1000.0

    special = SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    return Vocab(tokens, scores, types, special)
