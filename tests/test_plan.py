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


def test_conflicting_v_schemes_in_a_group_are_refused_with_the_group_named(tiny_random):
    with pytest.raises(PlanError) as e:
        _plan(tiny_random, overrides=[
            {"match": [_kv(19), _kv(24)], "scheme": "int8"},  # K agrees across the group
            {"match": [_kv(19, "v_proj")], "scheme": "int8"},
            {"match": [_kv(24, "v_proj")], "scheme": "int4"},
        ])
    msg = str(e.value)
    assert "layer 19 -> layers 24" in msg and "v_proj" in msg and "layers.24" in msg and "layers.19" in msg


def test_k_and_v_of_one_layer_may_differ(tiny_random):
    """K int8 and V int4 in a producer layer (and an ordinary one): each keeps its own scheme;
    a consumer that asks the same per projection is consistent with it."""
    plan = _plan(tiny_random, overrides=[
        {"match": [_kv(18), _kv(21), _kv(5)], "scheme": "int8"},
        {"match": [_kv(18, "v_proj"), _kv(21, "v_proj"), _kv(5, "v_proj")], "scheme": "int4"},
    ])
    for layer in (18, 5):
        assert plan[_kv(layer)].scheme.label() == "int8-g32-rtn"
        assert plan[_kv(layer, "v_proj")].scheme.label() == "int4-g32-rtn"


def test_override_on_producer_k_lifts_only_k(tiny_random):
    plan = _plan(tiny_random, overrides=[{"match": [_kv(18)], "scheme": "int8"}])
    assert plan[_kv(18)].scheme.type == "int8"
    assert plan[_kv(18, "v_proj")].scheme.label() == "int4-g32-rtn"


def test_consumer_asks_lift_k_and_v_separately(tiny_random):
    # A consumer's own (dead) v_proj asking int8 lifts the producer's V, not its K.
    plan = _plan(tiny_random, overrides=[{"match": [_kv(21, "v_proj")], "scheme": "int8"}])
    assert plan[_kv(18, "v_proj")].scheme.type == "int8"
    assert plan[_kv(18)].scheme.label() == "int4-g32-rtn"
    assert any("layer 18 v_proj" in n for n in plan.notes) and not any("layer 18 k_proj" in n for n in plan.notes)


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


def test_k_and_v_schemes_reach_both_formats(tiny_random, tmp_path):
    """K int8 + V int4 in a producer layer and an ordinary one, end to end: gguf-py reads the
    GGUF types back, and compressed-tensors (through transformers' loader) gives each module the
    scheme of its own config group."""
    from gguf import GGUFReader
    from transformers import Gemma3nForConditionalGeneration

    from quantize.pipeline import run

    keep = {t: "keep" for t in ("token_embeddings", "per_layer_embeddings", "vision", "audio")}
    recipe = parse_recipe({
        "model": str(tiny_random), "output": str(tmp_path / "out"),
        "towers": {"text": "int4", **keep},
        "overrides": [
            {"match": [_kv(18), _kv(21), _kv(5)], "scheme": "int8"},
            {"match": [_kv(18, "v_proj"), _kv(21, "v_proj"), _kv(5, "v_proj")], "scheme": "int4"},
        ],
        "exports": {"gguf": {"mix": "auto", "mmproj": False}, "safetensors": {"format": "compressed-tensors"}},
    })
    out = run(recipe, progress=False).out_dir
    gguf_path = next(out.glob("*.gguf"))
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors}
    for layer in (18, 5):
        assert types[f"blk.{layer}.attn_k.weight"] == "Q8_0" and types[f"blk.{layer}.attn_v.weight"] == "Q4_0"
    assert types["blk.17.attn_k.weight"] == "Q4_0" and types["blk.17.attn_v.weight"] == "Q4_0"

    model = Gemma3nForConditionalGeneration.from_pretrained(str(out / "safetensors"))
    layers = model.model.language_model.layers
    for layer in (18, 5):
        attn = layers[layer].self_attn
        assert attn.k_proj.quantization_scheme.weights.num_bits == 8
        assert attn.v_proj.quantization_scheme.weights.num_bits == 4


@pytest.mark.parametrize("recipe, where", [
    ({"towers": {"vision": "int4_gptq"}}, "towers.vision"),
    ({"towers": {"per_layer_projections": "int4_awq"}}, "towers.per_layer_projections"),
    ({"overrides": [{"match": ["*audio_tower*"], "scheme": "int8"}, {"match": ["*"], "scheme": "int4_gptq"}]}, "overrides[1]"),
])
def test_calibrated_methods_outside_the_text_decoder_are_refused(tiny_random, recipe, where):
    """GPTQ and AWQ run in the text decoder's sequential calibration only; elsewhere they would
    silently round to nearest, so the plan refuses them and names the tensor and the key."""
    with pytest.raises(PlanError) as e:
        _plan(tiny_random, **recipe)
    msg = str(e.value)
    assert where in msg and "'rtn'" in msg and "model." in msg


def test_calibrated_methods_on_text_decoder_linears_are_planned(tiny_random):
    plan = _plan(tiny_random, towers={"text": "int4_gptq"},
                 overrides=[{"match": ["*language_model.layers.*.mlp.*"], "scheme": "int4_awq"}])
    assert plan["model.language_model.layers.0.mlp.up_proj.weight"].scheme.method == "awq"
    assert plan["model.language_model.layers.0.self_attn.q_proj.weight"].scheme.method == "gptq"
