"""Runtimes that evaluate an artifact: one class per backend, the same small interface.

Every backend offers:

- ``vocab_size``;
- ``logits(tokens) -> np.ndarray`` float32 (len(tokens), vocab): one sequence evaluated from an
  empty cache, final (soft-capped) logits at every position;
- ``start_timer() / stop_timer() -> seconds`` around device work (CUDA events on GPUs);
- ``prefill(tokens) -> int``: empty the cache, process a prompt, return the greedy next token;
- ``decode(token, n) -> int``: greedily generate ``n`` tokens after the current cache;
- ``reset_peak_memory()`` and ``peak_memory() -> dict``;
- ``close()``.

``open_backend(name, artifact, device, threads)`` picks one. ``device`` is ``cpu``, ``cuda``
(the current CUDA device) or ``cuda:N``.
"""
from __future__ import annotations

import re
from pathlib import Path

from eval.errors import EvalError

BACKENDS = ("transformers", "llamacpp")
DEVICE_HELP = "cpu, cuda or cuda:N"


def parse_device(device: str) -> tuple[str, int | None]:
    """("cpu", None), ("cuda", None) or ("cuda", N); anything else is an error naming what is valid."""
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise EvalError(f"unknown --device {device!r}; valid: {DEVICE_HELP}")
    return m.group(1), int(m.group(2)) if m.group(2) is not None else None


def device_kind(device: str) -> str:
    """``cpu`` or ``cuda``."""
    return parse_device(device)[0]


def torch_device(device: str, what: str = "--device"):
    """The ``torch.device`` for ``device``, checked against the CUDA devices torch sees (``what``
    names the option or key in the message). Plain ``cuda`` is the current CUDA device."""
    import torch

    kind, index = parse_device(device)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise EvalError(f"{what} {device}: no CUDA device is available to torch")
    if index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if index >= torch.cuda.device_count():
        raise EvalError(f"{what} {device}: torch sees {torch.cuda.device_count()} CUDA device(s), "
                        f"valid: cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def artifact_kind(path: str | Path) -> str:
    """``gguf`` for a .gguf file, ``safetensors`` for a model folder; anything else is an error."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if p.is_dir() and (p / "config.json").exists():
        return "safetensors"
    if not p.exists():
        raise EvalError(f"{p}: artifact does not exist")
    raise EvalError(f"{p}: not an artifact; expected a .gguf file or a model folder with config.json")


def default_backend(path: str | Path) -> str:
    return "llamacpp" if artifact_kind(path) == "gguf" else "transformers"


def open_backend(name: str, artifact: str | Path, device: str = "cpu", threads: int | None = None, n_ctx: int = 2048):
    kind = artifact_kind(artifact)
    if name == "auto":
        name = default_backend(artifact)
    if name not in BACKENDS:
        raise EvalError(f"unknown --backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    if name == "llamacpp":
        if kind != "gguf":
            raise EvalError(f"{artifact}: --backend llamacpp needs a .gguf file, got a {kind} folder")
        from eval.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(artifact, device=device, threads=threads, n_ctx=n_ctx)
    if kind != "safetensors":
        raise EvalError(f"{artifact}: --backend transformers needs a model folder, got a .gguf file (use --backend llamacpp)")
    from eval.backends.hf import TransformersBackend

    return TransformersBackend(artifact, device=device, threads=threads)
