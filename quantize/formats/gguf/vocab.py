"""Gemma 3n's vocabulary for llama.cpp: SentencePiece pieces with scores and token types.

Follows llama.cpp's converter (``_create_vocab_sentencepiece`` as ``Gemma3NModel.set_vocab``
calls it, with the full ``vocab_size`` rather than ``vocab_size_per_layer_input``): ids below the
SentencePiece size take piece, score and type from ``tokenizer.model``; ``added_tokens.json``'s
tokens become USER_DEFINED; then each added token of the HF tokenizer becomes CONTROL when it is
special *or looks special* (the converter's ``does_token_look_special``: Gemma's ``<mask>``,
``<2mass>``, ``[@BOS@]`` and ``<unusedN>``, and ``<|...|>``), else USER_DEFINED with ``▁`` as a
space, score -1000; any id still unnamed is ``[PADn]`` / UNUSED. The tokenizer model is ``llama``
(SentencePiece) with no space prefix. So a folder as Google publishes it gives llama.cpp's own
vocabulary token for token (tests/test_gguf_llamacpp.py runs the converter on one).

One difference, on purpose: the converter reads added tokens only from ``tokenizer_config.json``'s
``added_tokens_decoder``, which transformers >= 5 no longer writes; a folder saved by it would
lose the multimodal slots' names and types (``[PAD262144]``, ...). We also read
``tokenizer.json``'s ``added_tokens`` (first, so ``tokenizer_config.json`` still has the last
word), which name the same tokens in both layouts.
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


# Added tokens that llama.cpp's converter makes CONTROL even when the tokenizer does not call
# them special (``ModelBase.does_token_look_special``: "Some models mark some added tokens which
# ought to be control tokens as not special", gemma and gemma-2 among them).
_LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def looks_special(text: str) -> bool:
    """The converter's ``does_token_look_special``, rule for rule."""
    return (
        text in _LOOKS_SPECIAL
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def _added_tokens_file(folder: Path) -> dict[str, int]:
    """``added_tokens.json`` (content -> id), as older tokenizers save their additions."""
    path = folder / "added_tokens.json"
    if not path.is_file():
        return {}
    data = _read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
        raise ExportError(f"{path}: expected an object of token -> integer id")
    return data


def _added_tokens(folder: Path) -> list[dict]:
    out: list[dict] = []
    tj = folder / "tokenizer.json"
    if tj.is_file():
        out += _read_json(tj).get("added_tokens", [])
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        dec = _read_json(tc).get("added_tokens_decoder", {}) or {}
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

    for content, i in _added_tokens_file(folder).items():
        if i >= vocab_size:
            raise ExportError(f"{folder / 'added_tokens.json'}: token {content!r} has id {i} >= vocab_size {vocab_size}")
        tokens[i] = content.encode("utf-8")
        scores[i] = -1000.0
        types[i] = int(TokenType.USER_DEFINED)

    for tok in _added_tokens(folder):
        i = int(tok["id"])
        if i >= vocab_size:
            raise ExportError(f"{folder}: added token {tok.get('content')!r} has id {i} >= vocab_size {vocab_size}")
        content = tok["content"]
        if tok.get("special", False) or looks_special(content):
            types[i] = int(TokenType.CONTROL)
        else:
            content = content.replace("\u2581", " ")  # llama.cpp pre-normalises user-defined spaces
            types[i] = int(TokenType.USER_DEFINED)
        tokens[i] = content.encode("utf-8")
        scores[i] = -1000.0

    special = SpecialVocab(folder, load_merges=False, n_vocab=vocab_size)
    return Vocab(tokens, scores, types, special)
