"""Quantization algorithms as pure tensor functions: RTN (plain and importance), GPTQ, AWQ.

References are independent of the code under test: hand-computed codes and scales (llama.cpp's
Q4_0 / Q8_0 conventions), the layer-output error ``||X (W_q - W)^T||`` computed directly, and
SQNR floors derived from the quantization step (noise ``step^2 / 12``).
"""
from __future__ import annotations

import math

import pytest
import torch

from quantize.methods.awq import absorb_into_linear, absorb_into_norm, awq_search
from quantize.methods.gptq import _all_finite, gptq_quantize, gptq_quantize_shared, reverse_cholesky
from quantize.methods.rtn import quantize_rtn
from quantize.methods.stats import ActStats, GramRows, HessianAccumulator
from quantize.schemes import QuantScheme, resolve_scheme

# SQNR floors (dB) on i.i.d. Gaussian weights, (256, 1024). Reasoning: Q4_0 uses the step
# d = max|x| / 8 per group; the max of 32 standard normals is about 2.0, so d ~ 0.25 and the
# rounding noise d^2/12 ~ 0.0054 gives ~22.7 dB (measured 21.3: the side opposite the signed
# max clips at +7). Larger groups have larger maxima (about 2.5 for 128, 3.3 per 1024-row):
# ~1.5-3 dB less. int8 has 16x finer steps (max/127): +24 dB. fp8 e4m3 has 3 mantissa bits:
# relative error uniform within +-2^-4 of the value, ~31 dB whatever the scale.
GAUSSIAN_FLOORS = {
    "int4-g32": 20.0, "int4-g64": 19.0, "int4-g128": 18.5, "int4-g256": 18.0, "int4-channel": 16.5,
    "int8-g32": 43.0, "int8-g64": 42.5, "int8-g128": 42.0, "int8-g256": 41.5, "int8-channel": 40.0,
    "fp8-channel": 30.0, "fp8-tensor": 30.0,
}
# Trained weights have heavier tails (a few large weights stretch the scale): 3 dB of slack,
# fp8 excepted (relative precision does not depend on the range).
TRAINED_SLACK = {"int4": 3.0, "int8": 3.0, "fp8": 0.5}


def sqnr(w: torch.Tensor, wq: torch.Tensor) -> float:
    return 10 * math.log10(float((w ** 2).sum() / ((w - wq) ** 2).sum()))


def scheme_for(key: str, symmetric: bool = True) -> QuantScheme:
    t, g = key.split("-")
    if g.startswith("g"):
        return QuantScheme(type=t, strategy="group", group_size=int(g[1:]), symmetric=symmetric)
    return QuantScheme(type=t, strategy=g, group_size=None)


def out_err(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float(((x @ (wq - w).T) ** 2).mean())


# ---------------------------------------------------------------- RTN against hand references


def test_q4_0_codes_and_scales_by_hand():
    # One row whose signed max is negative (-2.0: d = -2 / -8 = 0.25) and one whose signed max
    # is positive (3.0: d = 3 / -8 = -0.375), each a single group of 32, as in llama.cpp's
    # quantize_row_q4_0_ref.
    r0 = torch.zeros(32)
    r0[:6] = torch.tensor([-2.0, 1.9, 0.3, -0.6, 0.12, 1.0])
    r1 = torch.zeros(32)
    r1[:5] = torch.tensor([3.0, -1.0, -2.9, 0.2, 1.5])
    w = torch.stack([r0, r1])
    qt = quantize_rtn("w", w, QuantScheme(type="int4", group_size=32))
    assert qt.scales.dtype == torch.float16 and qt.codes.dtype == torch.int8
    assert qt.scales[:, 0].tolist() == [0.25, -0.375]
    # x / d rounded, clamped to [-8, 7]: 1.9/0.25 = 7.6 -> 8 -> clamp 7; 0.3/0.25 = 1.2 -> 1;
    # -0.6/0.25 = -2.4 -> -2; 0.12/0.25 = 0.48 -> 0; 1.0/0.25 = 4.
    assert qt.codes[0, :6].tolist() == [-8, 7, 1, -2, 0, 4]
    # 3/-0.375 = -8; -1/-0.375 = 2.67 -> 3; -2.9/-0.375 = 7.73 -> 8 -> clamp 7; 0.2/-0.375 = -0.53 -> -1;
    # 1.5/-0.375 = -4.
    assert qt.codes[1, :5].tolist() == [-8, 3, 7, -1, -4]
    assert torch.equal(qt.dequantize()[0, :6], torch.tensor([-2.0, 1.75, 0.25, -0.5, 0.0, 1.0]))


def test_q4_0_scale_takes_the_first_value_of_largest_magnitude():
    # llama.cpp's quantize_row_q4_0_ref keeps the first value whose |x| is largest (a strict
    # '<' while scanning), so where +a and -a both occur the earlier one sets d's sign; an
    # all-zero group keeps its first zero's sign (-0.0 / -8 = +0.0, 0.0 / -8 = -0.0).
    rows = torch.zeros(6, 32)
    rows[0, [3, 9]] = torch.tensor([0.5, -0.5])  # +a first: d = 0.5 / -8
    rows[1, [3, 9]] = torch.tensor([-0.5, 0.5])  # -a first: d = -0.5 / -8
    rows[2, [0, 31]] = torch.tensor([-1.0, 1.0])
    rows[3, 0] = -0.0  # all zeros, the first one negative
    rows[4, [2, 5]] = torch.tensor([0.25, -0.75])  # no tie: the negative one is larger
    rows[5] = torch.linspace(-1.0, 0.9, 32)
    want = []
    for r in rows.tolist():
        m = r[0]
        for v in r[1:]:
            if abs(m) < abs(v):
                m = v
        want.append(m / -8.0)
    qt = quantize_rtn("w", rows, QuantScheme(type="int4", group_size=32))
    got = qt.scales[:, 0].float()
    assert got.tolist() == torch.tensor(want).half().float().tolist()
    assert torch.signbit(got).tolist() == [math.copysign(1.0, w) < 0 for w in want]


def test_q8_0_and_asymmetric_by_hand():
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([-1.27, 0.5, 0.004])
    qt = quantize_rtn("w", w, QuantScheme(type="int8", group_size=32))
    d = float(torch.tensor(1.27 / 127, dtype=torch.float16))  # Q8_0: d = amax / 127, fp16
    assert qt.scales.item() == d
    assert qt.codes[0, :3].tolist() == [round(-1.27 / d), round(0.5 / d), round(0.004 / d)]
    # Asymmetric int4: range [min(lo, 0), max(hi, 0)] = [-1, 2] over 15 steps: s = 0.2, zero = 5.
    a = torch.zeros(1, 32)
    a[0, :3] = torch.tensor([-1.0, 2.0, 0.45])
    qa = quantize_rtn("a", a, QuantScheme(type="int4", group_size=32, symmetric=False))
    s = float(torch.tensor(0.2, dtype=torch.float16))
    assert qa.scales.item() == s and qa.zero_points.item() == 5
    assert qa.codes[0, :3].tolist() == [0, 15, round(0.45 / s) + 5]


@pytest.mark.parametrize("key", sorted(GAUSSIAN_FLOORS))
def test_sqnr_floor_gaussian(key):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    for sym in ((True, False) if not key.startswith("fp8") else (True,)):
        qt = quantize_rtn("w", w, scheme_for(key, sym))
        assert sqnr(w, qt.dequantize()) >= GAUSSIAN_FLOORS[key], (key, sym)


@pytest.mark.slow
def test_sqnr_floor_trained(tiny_trained):
    from safetensors import safe_open

    names = [f"model.language_model.layers.{i}.{m}.weight" for i in (0, 12, 19) for m in ("self_attn.q_proj", "mlp.down_proj")]
    with safe_open(str(tiny_trained / "model.safetensors"), framework="pt") as f:
        weights = {n: f.get_tensor(n) for n in names}
    for key, floor in GAUSSIAN_FLOORS.items():
        for n, w in weights.items():
            got = sqnr(w, quantize_rtn(n, w, scheme_for(key)).dequantize())
            assert got >= floor - TRAINED_SLACK[key.split("-")[0]], (key, n, got)


# ---------------------------------------------------------------- importance-weighted RTN


@pytest.mark.parametrize("kw", [
    dict(type="int4", group_size=32), dict(type="int4", group_size=128), dict(type="int8", group_size=32),
    dict(type="int4", group_size=32, symmetric=False), dict(type="int4", strategy="channel", group_size=None),
])
def test_importance_rtn_never_worse_in_weighted_error(kw):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    imp = torch.rand(256, generator=g) ** 4 * 10  # skewed, like real activation energies
    plain = quantize_rtn("w", w, QuantScheme(**kw))
    imp_q = quantize_rtn("w", w, QuantScheme(**kw, importance=True), importance=imp)
    per_group = lambda qt: ((qt.dequantize() - w) ** 2 * imp).reshape(64, qt.scales.shape[1], -1).sum(-1)  # noqa: E731
    e_plain, e_imp = per_group(plain), per_group(imp_q)
    assert (e_imp <= e_plain * (1 + 1e-6) + 1e-12).all()
    assert e_imp.sum() < 0.9 * e_plain.sum()
    # Still a valid block of the same format: codes in the grid, fp16 scales.
    bits = QuantScheme(**kw).bits
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if kw.get("symmetric", True) else (0, (1 << bits) - 1)
    assert imp_q.codes.min() >= lo and imp_q.codes.max() <= hi
    assert imp_q.scales.dtype == torch.float16 and imp_q.codes.dtype == plain.codes.dtype
    # Without the flag, or without statistics, it is plain RTN.
    assert torch.equal(quantize_rtn("w", w, QuantScheme(**kw), importance=imp).codes, plain.codes)
    assert torch.equal(quantize_rtn("w", w, QuantScheme(**kw, importance=True)).codes, plain.codes)


@pytest.mark.parametrize("kw", [
    dict(type="int8", group_size=32), dict(type="int4", group_size=32), dict(type="int4", group_size=32, symmetric=False),
])
def test_importance_search_picks_the_best_of_its_candidates(kw):
    """The search's candidate set written out group by group (llama.cpp's make_qx_quants: the
    RTN scale, the scale times each multiplier, and each of those refitted by weighted least
    squares to its own codes), every candidate's weighted error in float64: the scale the
    search keeps must reach the smallest of them, and its codes must be the RTN codes under
    that scale (the search keeps scales only and derives the codes at the end)."""
    from quantize.methods.rtn import EXTRA_CLIPS, IMPORTANCE_STEPS

    scheme = QuantScheme(**kw, importance=True)
    bits, sym = scheme.bits, scheme.symmetric
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 96, generator=g) * 0.05
    w[:, ::11] *= 6  # outliers that clipping trades against
    imp = torch.rand(96, generator=g) ** 4 * 10
    qt = quantize_rtn("w", w, scheme, importance=imp)
    wts = (imp + 1e-3 * imp.mean()).double()  # the floor quantize_int_importance adds
    nmax = (8.0 if bits == 4 else 127.0) if sym else float((1 << bits) - 1)
    qmax = (1 << bits) - 1
    lo_q, hi_q = ((-8, 7) if bits == 4 else (-127, 127)) if sym else (0, qmax)

    def codes(x, s, z):  # the format's rounding, in float32 as the encoders do it
        inv = torch.tensor(0.0) if s == 0 else 1.0 / torch.tensor(s, dtype=torch.float32)
        return torch.round(x * inv + z).clamp(lo_q, hi_q)

    def err(x, wg, s, z):
        q = codes(x, s, z).double() - z
        return float((wg * (x.double() - q * s) ** 2).sum()), q

    for r in range(w.shape[0]):
        for gi in range(w.shape[1] // 32):
            x, wg = w[r, gi * 32:(gi + 1) * 32], wts[gi * 32:(gi + 1) * 32]
            if sym:
                m = float(x[x.abs().argmax()])  # the signed max: Q4_0's d = m / -8; Q8_0's amax / 127
                base = float(torch.tensor(m / -8.0 if bits == 4 else abs(m) / 127.0).half())
                lo = 0.0
            else:
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                base = float(torch.tensor((hi - lo) / qmax).half())
            cands = [(base, 0.0 if sym else float(round(-lo / base) if base else 0.0))]
            for mult in [nmax / (nmax + 0.1 * i) for i in IMPORTANCE_STEPS if i] + list(EXTRA_CLIPS):
                s = float(torch.tensor(base * mult, dtype=torch.float32).half())
                z = 0.0 if sym else float(min(max(round(-lo * mult / s), 0), qmax)) if s else 0.0
                cands.append((s, z))
                _, q = err(x, wg, s, z)
                den = float((wg * q * q).sum())
                refit = float(torch.tensor(float((wg * x.double() * q).sum()) / den if den > 0 else 0.0).half())
                if (sym and refit * base > 0) or (not sym and refit > 0):
                    cands.append((refit, z))
            best = min(err(x, wg, s, z)[0] for s, z in cands)
            s_got = float(qt.scales[r, gi])
            z_got = 0.0 if sym else float(qt.zero_points[r, gi])
            got, _ = err(x, wg, s_got, z_got)
            assert got <= best * (1 + 1e-5) + 1e-18, (r, gi, got, best)
            assert torch.equal(qt.codes[r, gi * 32:(gi + 1) * 32].float(), codes(x, s_got, z_got)), (r, gi)


@pytest.mark.parametrize("preset", ["int8", "int4"])
def test_importance_without_statistics_minimises_plain_squared_error(preset):
    """Embedding tables have no activation statistics: a scheme asking for importance gets the
    scale search under uniform weights, never worse than RTN in squared error per group."""
    from quantize.methods.dispatch import quantize_tensor

    g = torch.Generator().manual_seed(3)
    w = torch.randn(128, 256, generator=g) * 0.02
    plain = quantize_rtn("e", w, resolve_scheme(preset))
    searched = quantize_tensor("e", w, QuantScheme(**{**resolve_scheme(preset).model_dump(), "importance": True}))
    err = lambda qt: ((qt.dequantize() - w) ** 2).reshape(128, -1, 32).sum(-1)  # noqa: E731
    assert (err(searched) <= err(plain) * (1 + 1e-6) + 1e-15).all()
    assert err(searched).sum() < err(plain).sum()
    lo = -127 if preset == "int8" else -8  # llama.cpp's Q8_0 kernels assume codes >= -127
    assert searched.codes.min() >= lo and plain.codes.min() >= lo


def test_importance_shape_checked():
    from quantize.errors import QuantizeError

    with pytest.raises(QuantizeError, match="w.x: importance has 3 entries but the tensor has 64"):
        quantize_rtn("w.x", torch.randn(4, 64), QuantScheme(type="int4", importance=True), importance=torch.ones(3))


# ---------------------------------------------------------------- statistics


def test_stats_match_direct_formulas():
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(2))
    h, a = HessianAccumulator(16), ActStats(16)
    for chunk in x:
        h.add(chunk)
        a.add(chunk)
    flat = x.reshape(-1, 16)
    assert torch.allclose(h.hessian(), flat.T @ flat / 150, atol=1e-5)
    assert torch.allclose(a.mean_sq, (flat ** 2).mean(0), atol=1e-6)
    assert torch.allclose(a.mean_abs, flat.abs().mean(0), atol=1e-6)
    assert torch.allclose(h.diag(), a.mean_sq, atol=1e-5)


@pytest.mark.parametrize("cols, block", [(200, 64), (200, 200), (130, 2048)])
def test_tiled_hessian_is_the_full_second_moment(cols, block):
    """The accumulator computes only the tiles on and above the diagonal (uneven last tile
    included) and mirrors the rest: against x^T x / n in float64 over chunks of different sizes
    (an empty one too), and still right when more tokens come after a read."""
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(n, cols, generator=g) * (torch.rand(cols, generator=g) * 3 + 0.1) for n in (37, 0, 90, 5)]
    acc = HessianAccumulator(cols, block=block)
    for c in chunks[:3]:
        acc.add(c)
    x = torch.cat(chunks[:3]).double()
    want = x.T @ x / x.shape[0]
    h = acc.hessian().double()
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    acc.add(chunks[3])
    x = torch.cat(chunks).double()
    torch.testing.assert_close(acc.hessian().double(), x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    torch.testing.assert_close(acc.diag().double(), (x ** 2).mean(0), rtol=1e-5, atol=1e-7)


def test_hessian_keeps_input_rows_up_to_the_limit_then_folds_them():
    """``rows_up_to``: the rows themselves while the tokens fit (no n x n matrix, their second
    moment against float64), and past the limit the same H as an accumulator that never kept
    them (bit for bit: the kept batches are folded in the order they came)."""
    g = torch.Generator().manual_seed(4)
    chunks = [torch.randn(n, 96, generator=g) * (torch.rand(96, generator=g) + 0.1) for n in (20, 30, 40)]
    kept, plain = HessianAccumulator(96, block=32, rows_up_to=50), HessianAccumulator(96, block=32)
    for c in chunks[:2]:
        kept.add(c)
        plain.add(c)
    assert kept.h is None and kept.n == 50
    before = torch.cat(chunks[:2])
    chunks[0].mul_(0)  # the caller reuses its buffer: the kept rows are a copy
    rows = kept.gram()
    assert torch.equal(rows.x, before)
    chunks[0].copy_(before[:20])
    x = torch.cat(chunks[:2]).double()
    torch.testing.assert_close(rows.dense().double(), x.T @ x / 50, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kept.diag().double(), (x ** 2).mean(0), rtol=1e-5, atol=1e-7)
    kept.add(chunks[2])  # 90 tokens: past the limit
    plain.add(chunks[2])
    assert kept.gram() is None
    assert torch.equal(kept.hessian(), plain.hessian())


# ---------------------------------------------------------------- GPTQ


def correlated_inputs(n: int, cols: int, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + 0.3 * torch.eye(cols)
    return (torch.randn(n, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.1)


@pytest.mark.parametrize("kw", [
    dict(type="int4", group_size=32), dict(type="int4", group_size=32, act_order=True),
    dict(type="int4", group_size=128, block_size=32), dict(type="int4", group_size=32, symmetric=False),
    dict(type="int8", group_size=32), dict(type="int4", strategy="channel", group_size=None),
])
def test_gptq_beats_rtn_on_correlated_inputs(kw):
    x = correlated_inputs(2048, 256)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(4))
    acc = HessianAccumulator(256)
    acc.add(x)
    scheme = QuantScheme(method="gptq", **kw)
    q = gptq_quantize("w", w, acc.hessian(), scheme)
    r = quantize_rtn("w", w, scheme)
    assert "fallback" not in q.info
    assert out_err(x, w, q.dequantize()) < 0.8 * out_err(x, w, r.dequantize())
    # Same grid and layout as RTN: the writers need nothing GPTQ-specific.
    assert q.codes.dtype == r.codes.dtype and q.scales.shape == r.scales.shape and q.scales.dtype == torch.float16
    bits = scheme.bits
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if scheme.symmetric else (0, (1 << bits) - 1)
    assert q.codes.min() >= lo and q.codes.max() <= hi


def test_gptq_act_order_uses_static_groups_in_original_order():
    x = correlated_inputs(2048, 256, seed=5)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(6))
    acc = HessianAccumulator(256)
    acc.add(x)
    ao = gptq_quantize("w", w, acc.hessian(), QuantScheme(type="int4", method="gptq", act_order=True))
    # Static groups: each group's scale is the RTN scale of the original weights of that group
    # (Q4_0: signed max / -8), whatever order the columns were processed in.
    groups = w.reshape(64, 8, 32)
    signed_max = torch.gather(groups, -1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(ao.scales, (signed_max / -8).to(torch.float16))
    plain = gptq_quantize("w", w, acc.hessian(), QuantScheme(type="int4", method="gptq"))
    assert not torch.equal(ao.codes, plain.codes)
    assert out_err(x, w, ao.dequantize()) < out_err(x, w, quantize_rtn("w", w, QuantScheme(type="int4")).dequantize())


def test_gptq_non_pd_hessian_falls_back_to_rtn():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    scheme = QuantScheme(type="int4", method="gptq", dampening=0.0)
    q = gptq_quantize("layer.w", w, -torch.eye(64), scheme)
    assert q.info["fallback"].startswith("rtn: hessian not positive definite")
    assert torch.equal(q.codes, quantize_rtn("w", w, QuantScheme(type="int4")).codes)
    nan = torch.eye(64)
    nan[3, 3] = float("nan")
    assert "non-finite" in gptq_quantize("w", w, nan, scheme).info["fallback"]
    # from input rows (low-rank act-order GPTQ): 8 tokens, 64 columns, no dampening: rank 8
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(8))
    ordered = QuantScheme(type="int4", method="gptq", dampening=0.0, act_order=True)
    q = gptq_quantize("layer.w", w, GramRows(x), ordered)
    assert q.info["fallback"].startswith("rtn: hessian not positive definite")
    assert torch.equal(q.codes, quantize_rtn("w", w, QuantScheme(type="int4")).codes)
    x[2, 5] = float("inf")
    assert "non-finite" in gptq_quantize("w", w, GramRows(x), ordered).info["fallback"]


@pytest.mark.parametrize("case", ["finite", "nan", "inf", "both infs", "sum overflows"])
def test_finiteness_check_agrees_with_isfinite(case):
    """GPTQ's finiteness check (a sum first, element by element only when the sum is not
    finite) against torch.isfinite(t).all(), including a NaN the infs' sum would be and finite
    values whose fp32 sum overflows."""
    t = torch.randn(3000, 40, generator=torch.Generator().manual_seed(3))
    if case == "nan":
        t[2999, 7] = float("nan")
    elif case == "inf":
        t[1500, 0] = float("inf")
    elif case == "both infs":
        t[5, 5], t[2500, 6] = float("inf"), float("-inf")
    elif case == "sum overflows":
        t[:10] = 3e38
    assert _all_finite(t) == bool(torch.isfinite(t).all())
    assert _all_finite(t) == (case in ("finite", "sum overflows"))


@pytest.mark.parametrize("given", ["hessian", "rows"])
def test_gptq_dead_columns_are_rounded_not_lost(given):
    """Also from input rows (low-rank act-order GPTQ, here with fewer tokens than columns)."""
    x = correlated_inputs(1024 if given == "hessian" else 16, 64, seed=8)
    x[:, [5, 40]] = 0.0  # never active in calibration
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(9))
    acc = HessianAccumulator(64)
    acc.add(x)
    h = acc.hessian() if given == "hessian" else GramRows(x)
    q = gptq_quantize("w", w, h, QuantScheme(type="int8", method="gptq", act_order=given == "rows"))
    assert q.info["dead_columns"] == 2 and "fallback" not in q.info
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    # A dead column passes no error on and receives none (H decouples it): with int8's fine
    # grid its values stay within one step of the originals.
    step = q.scales.to(torch.float32).abs().max()
    assert (deq[:, [5, 40]] - w[:, [5, 40]]).abs().max() <= step


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_leaves_the_callers_hessian_as_it_was(act_order):
    """The sequential engine hands one accumulator's Hessian to every linear of a stage (q/k/v,
    gate/up) without copying it: GPTQ must only read it, dead columns and act-order included."""
    x = correlated_inputs(512, 64, seed=10)
    x[:, 7] = 0.0
    acc = HessianAccumulator(64)
    acc.add(x)
    before = acc.hessian().clone()
    scheme = QuantScheme(type="int4", method="gptq", act_order=act_order)
    for seed in (11, 12):  # two linears of one stage
        gptq_quantize("w", torch.randn(16, 64, generator=torch.Generator().manual_seed(seed)), acc.hessian(), scheme)
        assert torch.equal(acc.hessian(), before)


def test_permute_symmetric_in_place_is_fancy_indexing():
    from quantize.methods.gptq import _permute_symmetric_

    g = torch.Generator().manual_seed(13)
    a = torch.randn(70, 70, generator=g)
    h = a @ a.T
    for perm in (torch.randperm(70, generator=g), torch.arange(70), torch.arange(69, -1, -1)):
        got = h.clone()
        _permute_symmetric_(got, perm, rows=16)
        assert torch.equal(got, h[perm][:, perm])


@pytest.mark.parametrize("rows", [1, 31, 32, 33, 70])
def test_transposed_copy_is_fancy_indexing(rows):
    """GPTQ's transposed copies (the weights, and the inputs of a low-rank down_proj) move slabs of
    rows; whatever the slab size against the row count, each is ``w[:, perm].T`` (or ``w.T``)."""
    from quantize.methods.gptq import TRANSPOSE_SLAB, _transposed

    g = torch.Generator().manual_seed(17)
    w = torch.randn(rows, 45, generator=g)
    assert TRANSPOSE_SLAB < 70  # the parametrisation crosses slab edges
    for perm in (None, torch.randperm(45, generator=g), torch.arange(44, -1, -1)):
        got = _transposed(w, perm)
        want = w.T if perm is None else w[:, perm].T
        assert got.shape == (45, rows) and got.is_contiguous()
        assert torch.equal(got, want)
    # a non-contiguous source (a column slice, as a caller's view may be)
    assert torch.equal(_transposed(w[:, 5:40], None), w[:, 5:40].T)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_consuming_the_hessian_gives_the_same_codes(act_order):
    """The last linear of a stage lets GPTQ work in the Hessian's own memory: same codes, scales
    and loss as on a copy; a fallback still weighs by the original diagonal (mean x^2)."""
    x = correlated_inputs(512, 64, seed=14)
    acc = HessianAccumulator(64)
    acc.add(x)
    scheme = QuantScheme(type="int4", method="gptq", act_order=act_order)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(15))
    kept = gptq_quantize("w", w, acc.hessian(), scheme)
    h = acc.hessian().clone()
    took = gptq_quantize("w", w, h, scheme, consume=True)
    assert torch.equal(took.codes, kept.codes) and torch.equal(took.scales, kept.scales)
    assert took.info == kept.info
    assert not torch.equal(h, acc.hessian())  # its memory was the working matrix

    bad = acc.hessian().clone()
    bad[5, 6] = bad[6, 5] = 10 * float(bad.diagonal().max())  # symmetric, finite, not positive definite
    diag = bad.diagonal().clone()
    imp = QuantScheme(type="int4", method="gptq", importance=True, act_order=act_order, dampening=0.0)
    fb = gptq_quantize("w", w, bad, imp, consume=True)
    assert fb.info["fallback"].startswith("rtn: hessian not positive definite")
    assert torch.equal(fb.codes, quantize_rtn("w", w, imp, importance=diag).codes)


def three_step_factor(h: torch.Tensor) -> torch.Tensor:
    """chol(H^-1) as the reference implementation computes it: chol(H), its inverse, chol again."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_reference(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, factor=three_step_factor,
                   dtype: torch.dtype = torch.float32):
    """GPTQ as it was before it was made fast: a plain transcription of Frantar et al. (arXiv
    2210.17323) Algorithm 1 with lazy batch updates, act-order and static groups, reading the
    upper Cholesky factor of H^-1 from ``factor`` (the reference's three steps by default), in
    the float operations of ``methods/gptq.py`` as of commit 8d56f78 when ``dtype`` is float32,
    or all in float64 (weights, Hessian, factor, updates; scales still fp16) as the exact
    algorithm to measure float32 implementations against. Returns (codes, scales, zeros)."""
    from quantize.methods.rtn import int_scales, symmetric_range

    w = weight.detach().to(dtype).clone()
    rows, cols = w.shape
    h = hessian.to(dtype).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    g_size = scheme.effective_group or cols
    bits, sym = scheme.bits, scheme.symmetric
    scales = torch.zeros(rows, cols // g_size, dtype=torch.float16)
    zeros = None if sym else torch.zeros(rows, cols // g_size, dtype=torch.uint8)
    perm = None
    if scheme.act_order:
        s0, z0 = int_scales(w.reshape(rows, -1, g_size), bits, sym)
        scales.copy_(s0)
        if zeros is not None:
            zeros.copy_(z0)
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
    h.diagonal().add_(scheme.dampening * torch.diagonal(h).mean())
    hinv = factor(h)
    del h
    orig_idx = perm.tolist() if perm is not None else list(range(cols))
    lo_q, hi_q = symmetric_range(bits) if sym else (0, (1 << bits) - 1)
    codes = torch.zeros(rows, cols, dtype=torch.int16)
    block = scheme.block_size
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = orig_idx[j] // g_size
            if perm is None and orig_idx[j] % g_size == 0:
                cur = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :g_size]
                s, z = int_scales(cur.unsqueeze(1), bits, sym)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            s = scales[:, g].to(dtype)
            inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
            col = w1[:, i]
            if zeros is None:
                q = torch.round(col * inv).clamp(lo_q, hi_q)
                dq = q * s
            else:
                zf = zeros[:, g].to(dtype)
                q = torch.round(col * inv + zf).clamp(lo_q, hi_q)
                dq = (q - zf) * s
            codes[:, j] = q.to(torch.int16)
            err = (col - dq) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        unperm = torch.empty_like(codes)
        unperm[:, perm] = codes
        codes = unperm
    return codes.to(torch.int8 if sym else torch.uint8), scales, zeros


@pytest.fixture(scope="module")
def trained_layer(tiny_trained):
    """A trained decoder layer's q_proj and down_proj with Hessians from their real inputs on
    the embedded calibration text (fewer tokens than down_proj's 512 inputs: a singular
    Hessian that only the dampening makes invertible, as with short calibration on E4B), and
    its k_proj and v_proj with q_proj's Hessian (the same input)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer, Gemma3nForConditionalGeneration

    from calibrate.embedded_text import split_documents

    model = Gemma3nForConditionalGeneration.from_pretrained(tiny_trained, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_trained)
    layer = model.model.language_model.layers[2]
    mods = {"q_proj": layer.self_attn.q_proj, "down_proj": layer.mlp.down_proj}
    inputs = {k: [] for k in mods}
    hooks = [m.register_forward_hook(lambda _m, inp, _out, k=k: inputs[k].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for k, m in mods.items()]
    with torch.no_grad():
        for d in split_documents("calib")[:3]:
            model(input_ids=tok(d.text, return_tensors="pt").input_ids[:, :128])
    for hk in hooks:
        hk.remove()
    acc = {k: HessianAccumulator(m.in_features) for k, m in mods.items()}
    for k, xs in inputs.items():
        for x in xs:
            acc[k].add(x)
    prefix = "model.language_model.layers.2."
    with safe_open(str(tiny_trained / "model.safetensors"), framework="pt") as f:
        weights = {"q_proj": f.get_tensor(prefix + "self_attn.q_proj.weight"),
                   "down_proj": f.get_tensor(prefix + "mlp.down_proj.weight"),
                   "k_proj": f.get_tensor(prefix + "self_attn.k_proj.weight"),
                   "v_proj": f.get_tensor(prefix + "self_attn.v_proj.weight")}
    out = {k: (weights[k].to(torch.float32), acc[k].hessian(), GramRows(torch.cat(inputs[k]))) for k in mods}
    for k in ("k_proj", "v_proj"):  # q_proj's input: its Hessian
        out[k] = (weights[k].to(torch.float32),) + out["q_proj"][1:]
    return out


def gptq_objective(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, group: int) -> float:
    """What GPTQ minimises, tr((W - Q) H (W - Q)^T), in float64, Q dequantized by hand."""
    c = codes.double() - (0 if zeros is None else zeros.double().repeat_interleave(group, dim=1))
    d = w.double() - c * scales.double().repeat_interleave(group, dim=1)
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))


@pytest.mark.parametrize("module", ["q_proj", "down_proj"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_is_the_textbook_algorithm_as_closely_as_float32_allows(trained_layer, module, act_order, symmetric, group_size):
    """The column loop reads H's reversed Cholesky factor R (H = R R^T) instead of the textbook's
    factor U of H^-1 (U = R^-1: the same algorithm in exact arithmetic). Against the textbook
    run in float64, it must agree as well as the textbook's own float32 run does: codes that
    differ only where a rounding sat on the edge of a step (and the errors fed on from there),
    and the same objective tr((W - Q) H (W - Q)^T)."""
    w, h, _x = trained_layer[module]
    assert_gptq_is_the_textbook_algorithm(w, h, h, act_order, symmetric, group_size)


@pytest.mark.parametrize("module", ["q_proj", "down_proj"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_from_input_rows_is_the_textbook_algorithm(trained_layer, module, symmetric, group_size):
    """Given the input rows instead of H (``GramRows``), act-order GPTQ factors dampening plus
    x^T x / t in low-rank form and never forms H; against the textbook in float64 on the H
    those rows define (to the last bit), as close as the textbook's own float32 run. 384
    tokens: below down_proj's 512 columns (H singular but for the dampening), above q_proj's 256."""
    w, _h, x = trained_layer[module]
    h = x.x.double().T @ x.x.double() / x.x.shape[0]
    assert_gptq_is_the_textbook_algorithm(w, x, h, True, symmetric, group_size)


def assert_gptq_is_the_textbook_algorithm(w, given, h, act_order, symmetric, group_size, quantize=None):
    """``gptq_quantize`` on ``given`` (H or its rows) against ``gptq_reference`` on ``h``;
    ``quantize(given, scheme)``: what gives the result instead, if not ``gptq_quantize``."""
    # block 48 (not a multiple of 32) puts group starts mid-block and groups across blocks
    for block in (128, 48):
        scheme = QuantScheme(type="int4", method="gptq", group_size=group_size, symmetric=symmetric,
                             act_order=act_order, block_size=block)
        got = quantize(given, scheme) if quantize is not None else gptq_quantize("w", w, given, scheme)
        assert "fallback" not in got.info
        exact = gptq_reference(w, h, scheme, dtype=torch.float64)
        f32 = gptq_reference(w, h.float(), scheme)
        assert got.codes.dtype == exact[0].dtype and got.scales.dtype == exact[1].dtype
        off_new = float((got.codes != exact[0]).float().mean())
        off_f32 = float((f32[0] != exact[0]).float().mean())
        # A rounding tie that falls the other way changes that row's later codes through GPTQ's
        # feedback, so the count moves in whole rows' tails: on an AVX512 host q_proj's asymmetric
        # codes from the rows were 0.35% off in 8 rows (1-78 codes each) where the float32
        # textbook was 0.15% off in 4. Hence a floor of two rows' codes besides float32's own count.
        assert off_new <= max(2 * off_f32, 2e-3, 2 / w.shape[0]), (block, off_new, off_f32)
        obj = lambda c, s, z: gptq_objective(w, h, c, s, z, group_size)  # noqa: E731
        best = obj(*exact)
        gap_new = abs(obj(got.codes, got.scales, got.zero_points) - best)
        # one flipped rounding moves the later columns' feedback: float32's own gap is the scale
        # (the textbook in float32 measured up to 0.7% of the objective on these layers, and the
        # same run's gap moves with BLAS threading); the code count above is the sharper check
        assert gap_new <= max(2 * abs(obj(*f32) - best), 1e-2 * best), (block, gap_new, best)


@pytest.mark.parametrize("given", ["hessian", "rows"])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_shared_hessian_gives_each_tensor_its_own_result(trained_layer, given, act_order, symmetric):
    """q/k/v (one input, one Hessian) stacked in one GPTQ run: each comes back under its own
    name and shape with the codes and scales GPTQ gives it alone (GPTQ is per row given H: the
    same sums in the same order, bit for bit with this machine's BLAS), from H or from the input
    rows (low-rank with act-order; H formed from them without); and q_proj's is as close to the
    float64 textbook run as the textbook's own float32 run. (k/v alone against the textbook:
    their 128 x 256 codes flip up to 0.4% there, alone as stacked, beyond that test's bound.)"""
    names = ["q_proj", "k_proj", "v_proj"]
    ws = [trained_layer[n][0] for n in names]
    _w, h, x = trained_layer["q_proj"]
    if given == "rows":
        given_h, h = x, x.x.double().T @ x.x.double() / x.x.shape[0]
    else:
        given_h = h
    for block in (128, 48):
        scheme = QuantScheme(type="int4", method="gptq", group_size=32, symmetric=symmetric, act_order=act_order,
                             block_size=block)
        res = gptq_quantize_shared(names, ws, given_h, scheme)
        assert [r.name for r in res] == names
        for r, n, w in zip(res, names, ws):
            alone = gptq_quantize(n, w, given_h, scheme)
            assert r.shape == alone.shape == tuple(w.shape) and "fallback" not in r.info
            assert torch.equal(r.codes, alone.codes) and torch.equal(r.scales, alone.scales), n
            assert (r.zero_points is None) == symmetric
            if not symmetric:
                assert torch.equal(r.zero_points, alone.zero_points), n
            assert r.info["loss"] == pytest.approx(alone.info["loss"], rel=1e-6)

    def quantize(g, scheme):
        return gptq_quantize_shared(names, ws, g, scheme)[0]
    assert_gptq_is_the_textbook_algorithm(ws[0], given_h, h, act_order, symmetric, 32, quantize=quantize)


def test_gptq_shared_checks_widths_and_falls_back_per_tensor():
    """Tensors of other input widths cannot share a Hessian (one line naming both); a Hessian
    that is not positive definite gives each tensor its own RTN result, under its own name."""
    from quantize.methods.gptq import HessianShapeError

    scheme = QuantScheme(type="int4", method="gptq")
    with pytest.raises(HessianShapeError, match=r"a \+ b: one Hessian cannot serve input widths \[64, 128\]"):
        gptq_quantize_shared(["a", "b"], [torch.randn(8, 64), torch.randn(8, 128)], torch.eye(64), scheme)
    ws = [torch.randn(8, 64), torch.randn(4, 64)]
    res = gptq_quantize_shared(["a", "b"], ws, -torch.eye(64), scheme)
    for r, n, w in zip(res, ["a", "b"], ws):
        assert r.name == n and "not positive definite" in r.info["fallback"]
        ref = quantize_rtn(n, w, scheme)
        assert torch.equal(r.codes, ref.codes) and torch.equal(r.scales, ref.scales)


@pytest.mark.parametrize("impl", ["blas", "torch"])
@pytest.mark.parametrize("block", [64, 300, 512])
def test_low_rank_factor_is_the_reversed_cholesky_of_diagonal_plus_rank_t(block, impl):
    """``_low_rank_factor`` of Z (n x t, t < n) and a diagonal: assembled into the dense upper R
    (diagonal blocks; R[j, k] = z_j . g_k above them) it satisfies R R^T = Z Z^T + diag in
    float64 to rounding, and equals the dense reversed Cholesky of that matrix (unique). Both
    implementations: the CPU's BLAS one (Phi's lower triangle only) and torch's (other devices)."""
    from quantize.methods import gptq

    factor = {"blas": gptq._low_rank_factor_blas, "torch": gptq._low_rank_factor_torch}[impl]
    g = torch.Generator().manual_seed(5)
    n = 300
    z = torch.randn(n, 40, generator=g, dtype=torch.float64) / 6
    extra = torch.rand(n, generator=g, dtype=torch.float64) * 0.1 + 0.01
    r_blocks, gt = factor(z, extra, block)
    r = torch.zeros(n, n, dtype=torch.float64)
    for bi, i1 in enumerate(range(0, n, block)):
        i2 = min(i1 + block, n)
        r[i1:i2, i1:i2] = r_blocks[bi]
        r[:i1, i1:i2] = z[:i1] @ gt[i1:i2].t()
    h = z @ z.t() + torch.diag(extra)
    assert torch.equal(r, r.triu())
    torch.testing.assert_close(r @ r.t(), h, rtol=0, atol=1e-12)
    dense, info = reverse_cholesky(h.clone())
    assert info == 0
    torch.testing.assert_close(r, dense, rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", ["blas", "torch"])
def test_low_rank_factor_names_the_column_where_it_fails(impl):
    """A matrix that is not positive definite: both implementations name the same (0-based)
    column, the one where the dense reversed Cholesky fails (``reverse_cholesky``'s 1-based)."""
    from quantize.methods import gptq

    factor = {"blas": gptq._low_rank_factor_blas, "torch": gptq._low_rank_factor_torch}[impl]
    g = torch.Generator().manual_seed(6)
    n = 200
    z = torch.randn(n, 20, generator=g, dtype=torch.float64) / 4
    extra = torch.full((n,), 0.05, dtype=torch.float64)
    extra[150] = -10.0  # the diagonal there is negative whatever Z adds
    dense_info = reverse_cholesky(z @ z.t() + torch.diag(extra))[1]
    assert dense_info > 0
    assert factor(z, extra, 64) == dense_info - 1 == 150


@pytest.mark.parametrize("module", ["q_proj", "down_proj"])
def test_gptq_factor_is_hs_reversed_cholesky(trained_layer, module):
    """``reverse_cholesky`` gives upper R with R R^T = H, as accurately as torch's own Cholesky
    (float64 reference: R = J chol(J H J) J), on LAPACK's in-place path and on torch's path."""
    _w, h, _x = trained_layer[module]
    h = h.clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(0.01 * torch.diagonal(h).mean())
    exact = torch.linalg.cholesky(h.double().flip(0, 1)).flip(0, 1)
    err = lambda r: float((r.double() - exact).norm() / exact.norm())  # noqa: E731
    torch_err = err(torch.linalg.cholesky(h.flip(0, 1)).flip(0, 1))
    lapack_r, info = reverse_cholesky(h.clone())
    torch_r, info2 = reverse_cholesky(h.clone().t())  # a transposed (non-contiguous) view: torch's path
    assert info == info2 == 0
    for r in (lapack_r, torch_r):
        assert torch.equal(r, r.triu())
        assert float((r.double() @ r.double().T - h.double()).norm() / h.double().norm()) < 1e-5
        assert err(r) <= 2 * torch_err + 1e-7, (err(r), torch_err)


def test_gptq_factor_reports_the_failing_column():
    h = torch.diag(torch.tensor([1.0, 2.0, -1.0, 3.0]))
    assert reverse_cholesky(h.clone())[1] == 3 == int(torch.linalg.cholesky_ex(h)[1])
    assert reverse_cholesky(h.clone().t())[1] == 3


# ---------------------------------------------------------------- AWQ


def test_awq_search_never_worse_than_plain_and_prefers_salient_channels():
    g = torch.Generator().manual_seed(10)
    cols = 256
    x = torch.randn(4096, cols, generator=g) * torch.where(torch.arange(cols) % 16 == 0, 20.0, 1.0)
    ws = [torch.randn(64, cols, generator=g), torch.randn(32, cols, generator=g)]
    scheme = QuantScheme(type="int4", method="awq")
    acts = ActStats(cols)
    acts.add(x)
    s = awq_search(ws, acts.mean_abs, scheme, acts.mean_sq)
    plain = QuantScheme(type="int4")

    def err(scales):
        return sum(out_err(x, w, quantize_rtn("w", w * scales, plain).dequantize() / scales) for w in ws)
    assert err(s) < 0.95 * err(torch.ones(cols))
    assert s[::16].mean() > s.mean()


def test_awq_absorb_helpers_keep_the_function():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(8, 32, generator=g)
    norm_w, wg, wu, wd = torch.randn(32, generator=g), torch.randn(48, 32, generator=g), torch.randn(48, 32, generator=g), torch.randn(32, 48, generator=g)
    s_in, s_mid = torch.rand(32, generator=g) + 0.5, torch.rand(48, generator=g) + 0.5

    def mlp(nw, g_, u_, d_):
        h = x * nw
        return (torch.nn.functional.gelu(h @ g_.T) * (h @ u_.T)) @ d_.T
    ref = mlp(norm_w, wg, wu, wd)
    nw2, (wg2, wu2) = absorb_into_norm(norm_w, [wg, wu], s_in)
    wu3, wd3 = absorb_into_linear(wu2, wd, s_mid)
    got = mlp(nw2, wg2, wu3, wd3)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
