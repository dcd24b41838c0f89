"""Plan: towers, scheme resolution and KV-sharing consistency, checked against transformers'
own description of the model (kv_sharing_modes, instantiated modules)."""
import pytest

from quantize.errors import PlanError
from quantize.model import Checkpoint, kv_groups
from quantize.plan import build_plan, format_plan
from quantize.recipe import parse_recipe


def _plan(folder, **recipe):
    return build_plan(parse_recipe({"model": str(folder), "output": "o", **recipe}), Checkpoint(folder))


def _kv(layer, leaf="k_proj"):
    return f"model.language_model.layers.{layer}.self_attn.{leaf}.weight"


def test_kv_groups_match_transformers(tiny_random):
    from transformers import AutoConfig

    tc = AutoConfig.from_pretrained(tiny_random).text_config
    modes = tc.kv_sharing_modes
    groups = kv_groups(Checkpoint(tiny_random).text_config)
    # transformers marks producers "store" and consumers "reuse"
    assert sorted(g.producer for g in groups) == [i for i, m in enumerate(modes) if m == "store"]
    assert sorted(c for g in groups for c in g.consumers) == [i for i, m in enumerate(modes) if m == "reuse"]
    for g in groups:
        assert all(tc.layer_types[c] == tc.layer_types[g.producer] for c in g.consumers)


def test_dead_kv_are_exactly_what_transformers_does_not_build(tiny_random):
    import torch
    from transformers import AutoConfig, Gemma3nForConditionalGeneration

    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(AutoConfig.from_pretrained(tiny_random))
    built = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    plan = _plan(tiny_random)
    dead = {e.name for e in plan.entries if e.dead}
    assert dead and dead == {e.name for e in plan.entries} - built
    assert all(not plan[n].quantized for n in dead)


def test_norms_never_quantized_and_towers_default(tiny_random):
    plan = _plan(tiny_random, towers={"text": "int4", "vision": "int8_channel", "altup_laurel": "int8"})
    for e in plan.entries:
        if len(e.shape) == 1:
            assert not e.quantized, e.name
    assert plan["model.language_model.layers.3.mlp.down_proj.weight"].scheme.label() == "int4-g32-rtn"
    assert plan["model.language_model.layers.3.laurel.linear_left.weight"].scheme.type == "int8"
    assert any(e.tower == "vision" and e.quantized for e in plan.entries)


def test_overrides_and_ignore(tiny_random):
    plan = _plan(
        tiny_random,
        overrides=[{"match": ["*layers.0.mlp.*"], "scheme": "int8"}],
        ignore=["*layers.1.mlp.down_proj*"],
    )
    assert plan["model.language_model.layers.0.mlp.up_proj.weight"].scheme.type == "int8"
    assert not plan["model.language_model.layers.1.mlp.down_proj.weight"].quantized
    assert plan["model.language_model.layers.2.mlp.up_proj.weight"].scheme.type == "int4"


def test_conflicting_kv_schemes_in_a_group_are_refused(tiny_random):
    with pytest.raises(PlanError) as e:
        _plan(tiny_random, overrides=[
            {"match": [_kv(18), _kv(18, "v_proj")], "scheme": "int4"},
            {"match": [_kv(21)], "scheme": "int8"},
        ])
    msg = str(e.value)
    assert "layer 18 -> layers 20, 21, 22, 23" in msg and "layers.21" in msg and "layers.18" in msg


def test_producer_kv_lifted_to_highest_precision_a_consumer_asks(tiny_random):
    plan = _plan(tiny_random, overrides=[{"match": ["*layers.22.self_attn.q_proj*"], "scheme": "int8"}])
    assert plan[_kv(18)].scheme.type == "int8" and plan[_kv(18, "v_proj")].scheme.type == "int8"
    # the other group's producer and ordinary layers keep the tower default
    assert plan[_kv(19)].scheme.type == "int4" and plan[_kv(5)].scheme.type == "int4"
    assert any("layer 18" in n for n in plan.notes)


def test_dry_run_text_lists_every_tower_and_totals(tiny_random):
    plan = _plan(tiny_random)
    text = format_plan(plan)
    for tower in ("text", "per_layer_embeddings", "vision", "audio", "altup_laurel"):
        assert tower in text
    before = sum(e.bytes_before for e in plan.entries)
    after = sum(e.bytes_after for e in plan.entries)
    assert f"{before:,}" in text and f"{after:,}" in text and after < before / 2
