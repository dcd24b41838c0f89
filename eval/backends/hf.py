"""transformers backend: safetensors folders, plain, compressed-tensors or bitsandbytes.

Gemma 3n folders load as ``Gemma3nForConditionalGeneration`` (the layout Google and our
writers use); other folders as ``AutoModelForCausalLM``. Quantized folders carry a
``quantization_config`` in config.json and transformers picks the matching loader. Timing on a
GPU uses CUDA events and synchronises before reading them; on the CPU, ``perf_counter``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from eval.backends import torch_device
from eval.errors import EvalError
from eval.memory import peak_rss_bytes, reset_peak_rss

log = logging.getLogger(__name__)


class TransformersBackend:
    name = "transformers"

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None, dtype: str = "auto"):
        from transformers import AutoModelForCausalLM, Gemma3nForConditionalGeneration

        self.path = Path(path)
        self.device = torch_device(device)
        if threads:
            torch.set_num_threads(threads)
        self.threads = torch.get_num_threads()
        try:
            config = json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EvalError(f"{self.path / 'config.json'}: unreadable model config ({e})") from e
        cls = Gemma3nForConditionalGeneration if config.get("model_type") == "gemma3n" else AutoModelForCausalLM
        quant = (config.get("quantization_config") or {}).get("quant_method")
        if quant == "bitsandbytes" and self.device.type != "cuda":
            log.warning("%s: bitsandbytes artifacts are meant for CUDA; trying the CPU anyway", self.path)
        log.info("loading %s with %s on %s", self.path, cls.__name__, self.device)
        # use_kernels: transformers >= 5.2x swaps layers for hub kernels by default (a network
        # fetch, and other arithmetic than the model the artifact was measured against).
        kwargs = {"dtype": dtype, "use_kernels": False}
        if quant == "bitsandbytes":
            kwargs["device_map"] = {"": self.device}
        self.model = cls.from_pretrained(str(self.path), **kwargs).eval()
        if quant != "bitsandbytes":
            self.model.to(self.device)
        text_cfg = self.model.config.get_text_config()
        self.vocab_size = int(text_cfg.vocab_size)
        self.quant_method = quant
        self._cache = None
        self._t0 = None

    # ---------------------------------------------------------------- quality
    @torch.inference_mode()
    def logits(self, tokens) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)[None]
        out = self.model(input_ids=ids, use_cache=False)
        return out.logits[0].float().cpu().numpy()

    # ---------------------------------------------------------------- timing
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start_timer(self) -> None:
        if self.device.type == "cuda":
            self._sync()
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t1 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop_timer(self) -> float:
        if self.device.type == "cuda":
            self._t1.record()
            self._t1.synchronize()
            return self._t0.elapsed_time(self._t1) / 1000.0
        return time.perf_counter() - self._t0

    @torch.inference_mode()
    def prefill(self, tokens) -> int:
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)[None]
        out = self.model(input_ids=ids, use_cache=True)
        self._cache = out.cache
        # The greedy token stays on the device: reading it back would add a sync to the timing.
        self._next = out.logits[0, -1].argmax().view(1, 1)
        return self._next

    @torch.inference_mode()
    def decode(self, token, n: int):
        nxt = token
        for _ in range(n):
            out = self.model(input_ids=nxt, cache=self._cache, use_cache=True)
            self._cache = out.cache
            nxt = out.logits[0, -1].argmax().view(1, 1)
        return nxt

    # ---------------------------------------------------------------- memory
    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        reset_peak_rss()

    def peak_memory(self) -> dict:
        mem = {"rss_peak_bytes": peak_rss_bytes()}
        if self.device.type == "cuda":
            mem["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            mem["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
        return mem

    def close(self) -> None:
        self.model = None
        self._cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
