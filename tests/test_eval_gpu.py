"""GPU path: the transformers backend on CUDA (CUDA-event timing, max-allocated memory)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_cuda_logits_match_cpu_and_latency_is_timed_with_events(tiny_random):
    from eval.backends.hf import TransformersBackend
    from eval.latency import measure

    tokens = [2] + list(range(300, 363))
    cpu = TransformersBackend(tiny_random, device="cpu")
    want = cpu.logits(tokens)
    cpu.close()
    gpu = TransformersBackend(tiny_random, device="cuda")
    try:
        got = gpu.logits(tokens)
        # fp32 on both; TF32 / kernel differences only
        lp_w = torch.log_softmax(torch.from_numpy(want), -1)
        lp_g = torch.log_softmax(torch.from_numpy(got), -1)
        kl = torch.nn.functional.kl_div(lp_g, lp_w, log_target=True, reduction="none").sum(-1)
        assert float(kl.max()) < 1e-3
        assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95
        lat = measure(gpu, np.arange(100, 400), bos=2, prompt_lengths=(32, 128), n_decode=8, repeats=3, warmup=1)
    finally:
        gpu.close()
    for run in lat["runs"]:
        assert run["ttft_s"]["median"] > 0 and run["decode_tok_s"] > 0
    assert lat["memory"]["cuda_max_allocated_bytes"] > 0
