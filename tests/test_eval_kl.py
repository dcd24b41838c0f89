"""eval.kl against torch's own KL divergence, and the KL base file round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval import kl as klmod
from eval.errors import EvalError
from eval.windows import perplexity


def _dists(n=50, vocab=300, seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, vocab, generator=g) * 3
    art = ref + torch.randn(n, vocab, generator=g) * noise
    return ref.numpy(), art.numpy()


def _base_rows(logits, k):
    lp = klmod.log_softmax(logits, logits.shape[-1])
    ids, vals = klmod.topk_rows(lp, k)
    return ids, vals, klmod.rest_logmass(lp, ids)


def test_full_vocab_matches_torch_kl_div():
    ref, art = _dists()
    ids, vals, rest = _base_rows(ref, 0)
    ours = klmod.kl_rows(ids, vals, rest, klmod.log_softmax(art, art.shape[-1]))
    p = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    q = torch.log_softmax(torch.from_numpy(art).double(), -1)
    want = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-7)


def test_topk_is_a_lower_bound_and_tightens_with_k():
    ref, art = _dists(seed=1)
    logq = klmod.log_softmax(art, art.shape[-1])
    full = klmod.kl_rows(*_base_rows(ref, 0), logq)
    prev = np.zeros_like(full)
    for k in (1, 8, 32, 128):
        approx = klmod.kl_rows(*_base_rows(ref, k), logq)
        assert np.all(approx <= full + 1e-6)
        assert np.all(approx >= prev - 1e-6)  # coarse-graining less: never smaller
        prev = approx
    assert approx.mean() > 0.5 * full.mean()


def test_identical_logits_give_exactly_zero():
    ref, _ = _dists(seed=2)
    for k in (0, 4, 32):
        ids, vals, rest = _base_rows(ref, k)
        kl = klmod.kl_rows(ids, vals, rest, klmod.log_softmax(ref.copy(), ref.shape[-1]))
        assert np.all(kl == 0.0)


def test_padded_vocab_is_dropped_and_smaller_vocab_refused():
    ref, _ = _dists(vocab=100)
    padded = np.concatenate([ref, np.full((ref.shape[0], 28), 5.0, np.float32)], axis=1)
    np.testing.assert_array_equal(klmod.log_softmax(padded, 100), klmod.log_softmax(ref, 100))
    with pytest.raises(EvalError, match="fewer than the reference"):
        klmod.log_softmax(ref[:, :90], 100)


def test_summary_and_perplexity_by_hand():
    s = klmod.kl_summary(np.array([0.0, 0.1, 0.2, 0.3]), np.array([True, True, False, True]))
    assert s["mean"] == pytest.approx(0.15) and s["top1"] == 0.75 and s["max"] == 0.3
    assert s["p99"] == pytest.approx(0.3 - 0.01 * 0.1 * 3, rel=1e-6)  # linear interpolation, numpy's default
    p = perplexity(np.array([1.0, 2.0, 3.0]))
    assert p["ppl"] == pytest.approx(np.e ** 2) and p["n_tokens"] == 3


def test_window_means_and_paired_ratio_by_hand():
    s = klmod.kl_summary(np.array([0.0, 0.1, 0.2, 0.3]), np.array([True] * 4), [0.05, 0.25])
    assert s["window_means"] == [0.05, 0.25] and s["mean"] == pytest.approx(0.15)
    a = np.array([1.0, 2.0, 3.0, 4.0])
    r = klmod.paired_ratio(2 * a, a)  # every resample of paired windows has ratio exactly 2
    assert r["ratio"] == 2 and r["lo"] == pytest.approx(2) and r["hi"] == pytest.approx(2) and r["windows"] == 4
    # two windows, KL 1 and 3 against 1 and 1: a resample is {0,0}, {0,1}/{1,0} or {1,1}, ratio 1, 2 or 3 with
    # probabilities 1/4, 1/2, 1/4, so the 5th and 95th percentiles are 1 and 3
    r = klmod.paired_ratio([1.0, 3.0], [1.0, 1.0], level=0.9)
    assert (r["ratio"], r["lo"], r["hi"]) == (2.0, 1.0, 3.0)
    assert klmod.paired_ratio([1.0, 3.0], [1.0, 1.0], level=0.9) == r  # deterministic
    with pytest.raises(EvalError, match="same windows"):
        klmod.paired_ratio([1.0, 2.0, 3.0], [1.0, 2.0])


def test_base_round_trip(tmp_path):
    ref, _ = _dists(n=6, vocab=40)
    ids, vals, rest = _base_rows(ref, 5)
    base = klmod.KLBase(tokens=np.arange(16, dtype=np.int32).reshape(2, 8), first=4, vocab=40,
                        top_ids=ids, top_logp=vals, rest_logp=rest, meta={"reference": "x"})
    path = base.save(tmp_path / "b.npz")
    back = klmod.KLBase.load(path)
    assert back.top_k == 5 and back.meta == {"reference": "x"} and back.first == 4
    np.testing.assert_array_equal(back.top_logp, vals)
    np.testing.assert_array_equal(back.rest_logp, rest)
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(EvalError, match="bad.npz"):
        klmod.KLBase.load(tmp_path / "bad.npz")
