"""fit's streamed probes against transformers' whole model (``measure.Prober`` and forward hooks).

The tiny trained model has 25 layers; the last 5 reuse the K/V of layers 18 (sliding) and 19
(full), so a probe of those k/v must run the consumers with the quantized cache; the token
table is also the tied output layer. Probe texts of two lengths make two batches.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

L = "model.language_model.layers"
TOKEN = "model.language_model.embed_tokens.weight"
PER_LAYER = "model.language_model.embed_tokens_per_layer.weight"


@pytest.fixture(scope="module")
def setup(tiny_trained):
    from quantize.fit.measure import Prober
    from quantize.model import Checkpoint

    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 4000, (1, 48), generator=g) for _ in range(2)] + [torch.randint(0, 4000, (1, 30), generator=g)]
    return Checkpoint(Path(tiny_trained)), texts, Prober(Path(tiny_trained), texts)


def test_streams_equal_the_whole_model_kl(setup):
    from quantize.fit.streamed_probe import run_probes

    ckpt, texts, prober = setup
    streams = [
        {TOKEN: "Q4_0"},  # embedding and output layer
        {PER_LAYER: "Q4_0"},
        {f"{L}.18.self_attn.k_proj.weight": "Q2_K"},  # store layers: their consumers read it
        {f"{L}.19.self_attn.v_proj.weight": "Q3_K"},
        {f"{L}.3.mlp.down_proj.weight": "Q4_0", f"{L}.3.self_attn.q_proj.weight": "Q4_K"},
        {f"{L}.22.mlp.up_proj.weight": "Q3_K", f"{L}.7.mlp.gate_proj.weight": "Q4_0", TOKEN: "Q8_0"},
    ]
    res = run_probes(ckpt, texts, streams, progress=False)
    assert res.positions == 2 * 48 + 30
    for s, kl in zip(streams, res.stream_kl):
        want = prober.kl(s)
        assert want > 0 and kl == pytest.approx(want, rel=1e-6), s


def _reference_scores(prober, j: int, swaps: dict, labels) -> float:
    """1/2 sum_r mean_m s_{m,r}^2 from transformers' whole model and its own autograd: s_{m,r} is
    the gradient of sum_t log q(y^m_{r,t}) at layer j's output (and at the K/V it shares, when it
    is a store layer; its consumers add up there) dotted with the change ``swaps`` makes to them."""
    from quantize.fit.measure import fake_quantized

    layer = prober.model.model.language_model.layers[j]
    seen = {}

    def keep(_m, _a, kwargs, out):
        seen["out"] = out
        seen["kv"] = None
        kv, kind = kwargs.get("shared_kv_states"), layer.self_attn.layer_type
        if kv is not None and layer.self_attn.store_full_length_kv:
            # the consumers read leaf copies: the gradient at them is theirs alone (layer j's own
            # attention also reads the stored tensors, and its part is in the output's change)
            kv[kind] = seen["kv"] = tuple(t.detach().requires_grad_(True) for t in kv[kind])

    handle = layer.register_forward_hook(keep, with_kwargs=True)
    total = 0.0
    try:
        for ids, y in zip(prober.texts, labels):
            with torch.no_grad():
                prober.model(input_ids=ids)
                base = (seen["out"], seen["kv"])
                saved = {}
                for name, t in swaps.items():
                    p = prober.params[name]
                    saved[name] = p.data
                    p.data = fake_quantized(p.data, t)
                prober.model(input_ids=ids)
                for name, data in saved.items():
                    prober.params[name].data = data
                delta = [seen["out"] - base[0]] + ([a - b for a, b in zip(seen["kv"], base[1])] if base[1] is not None else [])
            scores = []
            for m in range(y.shape[0]):
                with torch.enable_grad():
                    logits = prober.model(input_ids=ids).logits
                    at = [seen["out"]] + (list(seen["kv"]) if seen["kv"] is not None else [])
                    loss = torch.log_softmax(logits, -1).gather(-1, y[m].unsqueeze(-1)).sum()
                    g = torch.autograd.grad(loss, at)
                scores.append(sum((gi * di).sum(dim=tuple(k for k in range(di.dim()) if k != (1 if i == 0 else 0)))
                                  for i, (gi, di) in enumerate(zip(g, delta))).double())
            total += 0.5 * float((torch.stack(scores) ** 2).sum(1).mean())
    finally:
        handle.remove()
    return total / sum(int(t.numel()) for t in prober.texts)


def test_gradient_probes_equal_whole_model_autograd(setup):
    """The streamed Fisher estimate (layers recomputed one at a time from their stored inputs, the
    head's gradient by hand, K/V gradients carried from the consumers to their producer) against
    the same estimate from transformers' whole model and autograd, on the same labels."""
    from quantize.fit.streamed_probe import gradient_probes

    ckpt, texts, prober = setup
    g = torch.Generator().manual_seed(1)
    labels = [torch.randint(0, 4352, (4, *ids.shape), generator=g) for ids in prober.texts]
    probes = [{f"{L}.5.self_attn.q_proj.weight": "Q4_0"},
              {f"{L}.5.mlp.down_proj.weight": "Q2_K", f"{L}.5.mlp.up_proj.weight": "Q4_0"},
              {f"{L}.18.self_attn.k_proj.weight": "Q4_0"},  # a store layer: its consumers read the K/V
              {f"{L}.19.self_attn.v_proj.weight": "Q3_K"},
              {f"{L}.22.mlp.gate_proj.weight": "Q4_0"}]  # a consumer layer
    est = gradient_probes(ckpt, texts, probes, samples=4, labels=labels, progress=False)
    for probe, e in zip(probes, est):
        want = _reference_scores(prober, int(next(iter(probe)).split(".")[3]), probe, labels)
        assert want > 0 and e == pytest.approx(want, rel=1e-4), probe
    with pytest.raises(ValueError, match="one decoder layer"):
        gradient_probes(ckpt, texts, [{f"{L}.5.mlp.up_proj.weight": "Q4_0", f"{L}.6.mlp.up_proj.weight": "Q4_0"}])


@pytest.fixture(scope="module")
def groups(tiny_trained, tmp_path_factory):
    """fit's groups of layers 5 and 19 and the two tables (the rest of the model is not probed here)."""
    from quantize.fit import measure
    from quantize.fit import run as fitrun
    from quantize.recipe import parse_recipe

    r = parse_recipe({"name": "p", "model": str(tiny_trained), "output": str(tmp_path_factory.mktemp("p") / "o"),
                      "exports": {"gguf": {"mmproj": False}}}, "t")
    _, _, _, gs, _ = fitrun.plan_groups(r)
    keep = [g for g in gs if g.name.startswith(("blk.5.", "blk.19.", "token_embd", "per_layer_token_embd"))]
    measure.measure_errors(keep, fitrun.plan_groups(r)[1])
    return keep


def test_gradient_mode_ranks_groups_as_their_true_kl(setup, groups):
    """probes="gradient" (fit's default): the tables get their true KL (transformers); the
    decoder groups' Fisher estimates rank as their true KL does and are near it (second order
    with 8 label draws: within a factor of 3 here)."""
    import copy

    from scipy.stats import spearmanr

    from quantize.fit import measure

    ckpt, texts, prober = setup
    gs = copy.deepcopy(groups)
    measure.measure_sensitivity(gs, ckpt, texts, "Q4_0", progress=False)
    true = {g.name: prober.kl({s: measure.probe_type(g, "Q4_0") for s in g.sources}) for g in gs}
    for g in gs:
        if g.name.startswith(("token_embd", "per_layer_token_embd")):
            assert g.probe_kl == pytest.approx(true[g.name], rel=1e-6), g.name
        assert g.sensitivity == pytest.approx(g.probe_kl / g.error[measure.probe_type(g, "Q4_0")], rel=1e-12)
    inside = [g for g in gs if g.name.startswith("blk.") and true[g.name] > 1e-12]
    assert len(inside) >= 12
    rho = spearmanr([g.probe_kl for g in inside], [true[g.name] for g in inside]).statistic
    assert rho >= 0.9, rho
    assert all(1 / 3 < g.probe_kl / true[g.name] < 3 for g in inside), [(g.name, g.probe_kl, true[g.name]) for g in inside]


def test_group_probes_are_each_groups_true_kl(setup, groups):
    import copy

    from quantize.fit import measure

    ckpt, texts, prober = setup
    gs = copy.deepcopy([g for g in groups if g.name.startswith(("blk.5.", "token_embd"))])
    gs[0].pinned = gs[0].types[-1]  # a pinned group is not probed
    measure.measure_sensitivity(gs, ckpt, texts, "Q4_0", progress=False, probes="group")
    assert gs[0].probe_kl is None and gs[0].sensitivity == 0.0
    for g in gs[1:]:
        assert g.probe_kl == pytest.approx(prober.kl({s: measure.probe_type(g, "Q4_0") for s in g.sources}), rel=1e-6), g.name
