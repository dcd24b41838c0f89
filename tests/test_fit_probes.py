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


def _layer_output_change(prober, j: int, swaps: dict) -> float:
    """Sum of squares of layer j's output change (all AltUp streams, every position) when the
    whole model runs with ``swaps`` fake-quantized (all in layer j, so its input is the base's)."""
    from quantize.fit.measure import fake_quantized

    layer = prober.model.model.language_model.layers[j]
    outs: dict[str, list] = {"base": [], "swapped": []}
    key = {"k": "base"}
    handle = layer.register_forward_hook(lambda _m, _a, out: outs[key["k"]].append(out.detach().double()))
    saved = {}
    try:
        with torch.inference_mode():
            for ids in prober.texts:
                prober.model(input_ids=ids)
            for name, t in swaps.items():
                p = prober.params[name]
                saved[name] = p.data
                p.data = fake_quantized(p.data, t)
            key["k"] = "swapped"
            for ids in prober.texts:
                prober.model(input_ids=ids)
    finally:
        handle.remove()
        for name, data in saved.items():
            prober.params[name].data = data
    return sum(float(((a - b) ** 2).sum()) for a, b in zip(outs["swapped"], outs["base"]))


def test_local_probes_are_the_layer_output_change_in_transformers(setup):
    from quantize.fit.streamed_probe import run_probes

    ckpt, texts, prober = setup
    whole = {f"{L}.5.{m}.weight": "Q4_0" for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")}
    local = [{f"{L}.5.self_attn.q_proj.weight": "Q4_0"}, {f"{L}.5.mlp.down_proj.weight": "Q2_K"},
             {f"{L}.18.self_attn.o_proj.weight": "Q4_0"}]  # a store layer: its probe must not touch the shared K/V
    res = run_probes(ckpt, texts, [whole], local, progress=False)
    assert res.stream_change[0] == pytest.approx(_layer_output_change(prober, 5, whole), rel=1e-6)
    for q, s in enumerate(local):
        j = int(next(iter(s)).split(".")[3])
        assert res.local_change[q] == pytest.approx(_layer_output_change(prober, j, s), rel=1e-6)
    with pytest.raises(ValueError, match="one decoder layer"):
        run_probes(ckpt, texts, [], [{f"{L}.5.mlp.up_proj.weight": "Q4_0", f"{L}.6.mlp.up_proj.weight": "Q4_0"}])


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


def test_layer_probes_share_the_true_layer_kl_by_output_change(setup, groups):
    """probes="layer": a local group's KL is the true KL of its layer (every local group of the
    layer fake-quantized, transformers) times its own output change over the layer's (hooks);
    the tables and the store layer's k/v get their own true KL."""
    import copy

    from quantize.fit import measure

    ckpt, texts, prober = setup
    gs = copy.deepcopy(groups)
    measure.measure_sensitivity(gs, ckpt, texts, "Q4_0", progress=False, probes="layer")
    sw = lambda sel: {s: measure.probe_type(g, "Q4_0") for g in sel for s in g.sources}  # noqa: E731
    for j in (5, 19):
        local = [g for g in gs if g.name.startswith(f"blk.{j}.") and not (j == 19 and g.name.split(".")[2] in ("attn_k", "attn_v"))]
        assert len(local) == (9 if j == 5 else 7)
        kl_layer, d_layer = prober.kl(sw(local)), _layer_output_change(prober, j, sw(local))
        for g in local:
            want = kl_layer * _layer_output_change(prober, j, sw([g])) / d_layer
            assert g.probe_kl == pytest.approx(want, rel=1e-5), g.name
    own = [g for g in gs if not g.name.startswith("blk.5.") and g not in [x for x in gs if x.name.startswith("blk.19.")
                                                                          and x.name.split(".")[2] not in ("attn_k", "attn_v")]]
    assert sorted(g.name for g in own) == ["blk.19.attn_k.weight", "blk.19.attn_v.weight", "per_layer_token_embd.weight",
                                           "token_embd.weight"]
    for g in own:
        assert g.probe_kl == pytest.approx(prober.kl(sw([g])), rel=1e-6), g.name
    for g in gs:
        assert g.sensitivity == pytest.approx(g.probe_kl / g.error[measure.probe_type(g, "Q4_0")], rel=1e-12)


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
