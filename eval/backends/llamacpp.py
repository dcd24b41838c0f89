"""llama.cpp backend through llama-cpp-python: GGUF files, layers offloaded on CUDA.

Two contexts, opened in turn: quality runs with ``logits_all=True`` (every position's logits,
like ``llama-perplexity``); latency runs with ``logits_all=False`` so that a prefill computes
the output layer for its last token only, as ``llama-bench`` and real serving do. Prompts are
decoded in one ``llama_decode`` call (``n_batch = n_ctx``); the greedy token is read from the
last logits, which also synchronises the GPU before the timer stops.
"""
from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from eval.backends import parse_device
from eval.errors import EvalError
from eval.memory import peak_rss_bytes, reset_peak_rss

log = logging.getLogger(__name__)


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, n_ctx: int = 2048):
        try:
            import llama_cpp
        except ImportError as e:
            raise EvalError("--backend llamacpp needs the llama-cpp-python package (pip install llama-cpp-python)") from e
        self.lc = llama_cpp
        self.path = Path(path)
        kind, index = parse_device(device)
        if kind == "cuda" and not llama_cpp.llama_supports_gpu_offload():
            raise EvalError(f"--device {device}: this llama-cpp-python build has no GPU offload (rebuild with -DGGML_CUDA=on)")
        self.device = kind
        self.n_gpu_layers = -1 if kind == "cuda" else 0
        # cuda:N: every layer on GPU N alone (llama.cpp refuses an N it does not have);
        # plain cuda: llama.cpp's default, layers split over the visible GPUs.
        self._gpu = {} if index is None else {"split_mode": llama_cpp.LLAMA_SPLIT_MODE_NONE, "main_gpu": index}
        self.threads = threads or os.cpu_count() or 1
        self.n_ctx = n_ctx
        self._llm = None
        self._logits_all = None
        self._t0 = 0.0
        self._open(logits_all=True)
        self.vocab_size = int(self._llm.n_vocab())

    def _open(self, logits_all: bool):
        if self._llm is not None and self._logits_all == logits_all:
            return self._llm
        self._close_llm()
        try:
            self._llm = self.lc.Llama(
                model_path=str(self.path),
                n_ctx=self.n_ctx,
                n_batch=self.n_ctx,
                n_ubatch=min(self.n_ctx, 512),
                n_threads=self.threads,
                n_threads_batch=self.threads,
                n_gpu_layers=self.n_gpu_layers,
                logits_all=logits_all,
                seed=0,
                verbose=False,
                **self._gpu,
            )
        except ValueError as e:  # llama-cpp-python raises ValueError when llama.cpp refuses the file
            raise EvalError(f"{self.path}: llama.cpp could not load this GGUF ({e}); run with verbose logs for its reason") from e
        self._logits_all = logits_all
        return self._llm

    def _close_llm(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    # ---------------------------------------------------------------- quality
    def logits(self, tokens) -> np.ndarray:
        llm = self._open(logits_all=True)
        tokens = [int(t) for t in tokens]
        if len(tokens) > self.n_ctx:
            raise EvalError(f"{len(tokens)} tokens exceed the llama.cpp context of {self.n_ctx}")
        self._clear(llm)
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)

    # ---------------------------------------------------------------- timing
    def _clear(self, llm) -> None:
        mem = self.lc.llama_get_memory(llm.ctx)
        self.lc.llama_memory_clear(mem, True)
        llm.n_tokens = 0

    def start_timer(self) -> None:
        self._t0 = time.perf_counter()

    def stop_timer(self) -> float:
        return time.perf_counter() - self._t0

    def _greedy(self, llm) -> int:
        ptr = self.lc.llama_get_logits_ith(llm.ctx, -1)  # synchronises the device
        row = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.vocab_size,))
        return int(row.argmax())

    def prefill(self, tokens) -> int:
        llm = self._open(logits_all=False)
        self._clear(llm)
        llm.eval([int(t) for t in tokens])
        return self._greedy(llm)

    def decode(self, token, n: int) -> int:
        llm = self._llm
        nxt = int(token)
        for _ in range(n):
            llm.eval([nxt])
            nxt = self._greedy(llm)
        return nxt

    # ---------------------------------------------------------------- memory
    def reset_peak_memory(self) -> None:
        reset_peak_rss()

    def peak_memory(self) -> dict:
        mem = {"rss_peak_bytes": peak_rss_bytes()}
        if self.device == "cuda":
            used = _nvidia_smi_process_memory(os.getpid())
            if used is not None:
                mem["cuda_process_used_bytes"] = used  # current, not peak: llama.cpp allocates up front
        return mem

    def close(self) -> None:
        self._close_llm()


def _nvidia_smi_process_memory(pid: int) -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1]) * 1024 * 1024
    return None
