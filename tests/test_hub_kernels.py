"""transformers >= 5.2x swaps layers for hub kernels on every ``from_pretrained`` unless told
not to, and refuses to load at all where the ``kernels`` package is missing or of another version
(the CUDA image the GPU checks ran on, 2026-12-04: 15 GPU tests failed on it). The project's own
loaders pass ``use_kernels=False``: these tests take the ``kernels`` package away (as that image
did) and lift the suite's ``USE_HUB_KERNELS=NO`` (tests/conftest.py), so only the loaders' own
argument keeps them loading."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def no_hub_kernels(monkeypatch):
    import transformers.modeling_utils as mu
    from transformers import Gemma3nForConditionalGeneration

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    monkeypatch.setattr(mu, "is_kernels_available", lambda *a, **k: False)
    return Gemma3nForConditionalGeneration


def test_transformers_refuses_a_default_load_without_kernels(no_hub_kernels, tiny_random):
    """The premise: without the argument, transformers 5.25 does refuse (else the tests below
    would pass whether or not the loaders pass it)."""
    with pytest.raises(ValueError, match="Kernels are not available"):
        no_hub_kernels.from_pretrained(str(tiny_random))


def test_eval_backend_loads_without_kernels(no_hub_kernels, tiny_random):
    from eval.backends.hf import TransformersBackend

    be = TransformersBackend(tiny_random)
    assert not be.model.use_kernels
    ref = no_hub_kernels.from_pretrained(str(tiny_random), use_kernels=False).eval()
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        torch.testing.assert_close(be.model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)


def test_fit_prober_loads_without_kernels(no_hub_kernels, tiny_random):
    from quantize.fit.measure import Prober

    p = Prober(tiny_random, [torch.arange(1, 17)])  # token ids
    assert not p.model.use_kernels
