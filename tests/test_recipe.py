"""Recipe schema: shipped recipes load; bad recipes fail with the key's path and valid values."""
from pathlib import Path

import pytest

from quantize.errors import RecipeError
from quantize.recipe import load_recipe, parse_recipe
from quantize.schemes import PRESET_SCHEMES, QuantScheme, resolve_scheme

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_all_shipped_recipes_are_tested():
    assert {p.stem for p in RECIPES} >= {"demo", "int4", "int8", "fp8"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert r.version == 1
    assert r.exports.gguf is not None or r.exports.safetensors is not None
    # every tower resolved to a concrete scheme object
    for name in type(r.towers).model_fields:
        assert isinstance(getattr(r.towers, name), QuantScheme)


def test_real_recipes_target_e4b():
    for stem in ("int4", "int8", "fp8"):
        assert load_recipe(Path("recipes") / f"{stem}.yaml").model == "google/gemma-3n-E4B-it"


def _err(data) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, "r.yaml")
    return str(e.value)


def test_unknown_key_names_its_path():
    msg = _err({"model": "m", "output": "o", "towers": {"vison": "int8"}})
    assert "towers.vison" in msg and "r.yaml" in msg


def test_unknown_nested_calibration_key():
    msg = _err({"model": "m", "output": "o", "calibration": {"text": {"n_sample": 3}}})
    assert "calibration.text.n_sample" in msg


def test_wrong_type():
    msg = _err({"model": "m", "output": "o", "seed": "zero"})
    assert "seed" in msg


def test_unknown_preset_lists_valid_ones():
    msg = _err({"model": "m", "output": "o", "towers": {"text": "int3"}})
    assert "int3" in msg and all(p in msg for p in ("int4", "int8", "fp8", "keep"))


def test_invalid_scheme_combination():
    assert "fp8" in _err({"model": "m", "output": "o", "towers": {"text": {"type": "fp8", "method": "gptq", "strategy": "channel"}}})
    assert "group_size" in _err({"model": "m", "output": "o", "towers": {"text": {"type": "int4", "group_size": 48}}})


def test_missing_required_and_version():
    assert "model" in _err({"output": "o"})
    assert "version" in _err({"model": "m", "output": "o", "version": 2})


def test_preset_with_overrides_and_exports():
    r = parse_recipe({"model": "m", "output": "o", "towers": {"text": {"preset": "int4_gptq", "act_order": True}},
                      "exports": {"gguf": {"mix": "Q4_K_M"}}})
    assert r.towers.text.method == "gptq" and r.towers.text.act_order and r.towers.text.group_size == 32
    assert "mix" in _err({"model": "m", "output": "o", "exports": {"gguf": {"mix": "Q3_Z"}}})


def test_gguf_tensor_types_are_strict_and_last_match_wins():
    from quantize.formats.gguf.mixes import named_type

    bad = _err({"model": "m", "output": "o", "exports": {"gguf": {"tensor_types": [{"match": ["blk.*"], "type": "Q3_Z"}]}}})
    assert "Q3_Z" in bad and "Q6_K" in bad  # names the bad type and lists the valid ones
    assert "tensor_types.0.match" in _err({"model": "m", "output": "o", "exports": {"gguf": {"tensor_types": [{"matchh": ["x"], "type": "Q8_0"}]}}})
    r = parse_recipe({"model": "m", "output": "o", "exports": {"gguf": {"tensor_types": [
        {"match": ["blk.*.ffn_down.weight", "blk.*.attn_v.weight"], "type": "Q6_K"}, {"match": ["blk.0.*"], "type": "Q8_0"}]}}})
    rules = r.exports.gguf.tensor_types
    assert named_type("blk.3.ffn_down.weight", rules) == "Q6_K"
    assert named_type("blk.0.ffn_down.weight", rules) == "Q8_0"
    assert named_type("blk.3.ffn_up.weight", rules) is None


def test_presets_are_frozen_and_strict():
    s = resolve_scheme("int4")
    with pytest.raises(Exception):
        s.group_size = 64  # frozen
    with pytest.raises(Exception):
        QuantScheme(type="int4", colour="red")
    assert set(PRESET_SCHEMES) >= {"int4", "int8", "fp8", "keep"}


def test_scheme_bytes_hand_computed():
    # 64 x 128 int4 group 32: 4096 bytes of codes + 64*4 fp16 scales = 4096 + 512
    assert resolve_scheme("int4").bytes_for((64, 128), 4) == 64 * 128 // 2 + 64 * 4 * 2
    # asymmetric adds one zero-point byte per group
    assert resolve_scheme("int4_asym").bytes_for((64, 128), 4) == 64 * 128 // 2 + 64 * 4 * 3
    # fp8 per channel: one byte per value + one fp32 scale per row
    assert resolve_scheme("fp8").bytes_for((64, 128), 2) == 64 * 128 + 64 * 4


@pytest.mark.parametrize("scheme, key", [
    ({"preset": "int4", "act_order": True}, "act_order"),             # RTN has no column order
    ({"type": "int4", "method": "awq", "dampening": 0.1}, "dampening"),
    ({"preset": "int8", "block_size": 64}, "block_size"),
    ({"type": "keep", "group_size": 64}, "group_size"),               # keep reads nothing but its type
    ({"type": "keep", "method": "gptq"}, "method"),
    ({"type": "int8", "strategy": "channel", "group_size": 64}, "group_size"),
    ({"preset": "int8_channel", "group_size": 128}, "group_size"),
    ({"preset": "fp8", "importance": True}, "importance"),            # fp8 rounds to nearest
    ({"preset": "int4_awq", "importance": True}, "importance"),       # AWQ quantizes with plain RTN
])
def test_scheme_keys_the_scheme_does_not_read_are_refused(scheme, key):
    """A key that would be accepted and ignored fails, naming the key and what reads it."""
    msg = _err({"model": "m", "output": "o", "towers": {"text": scheme}})
    assert "towers.text" in msg and key in msg and "does not read" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("scheme", [
    {"preset": "int4_gptq", "act_order": True, "dampening": 0.05, "block_size": 64, "importance": True},
    {"type": "int8", "strategy": "channel"},
    {"preset": "int8_channel", "group_size": None},
    {"preset": "int8_channel", "importance": True},
    {"type": "fp8", "strategy": "tensor", "symmetric": True},
    {"preset": "keep"},
    {"type": "keep"},
])
def test_scheme_keys_the_scheme_reads_are_accepted(scheme):
    r = parse_recipe({"model": "m", "output": "o", "towers": {"text": scheme}})
    for k, v in scheme.items():
        if k != "preset":
            assert getattr(r.towers.text, k) == v


@pytest.mark.parametrize("text, key", [
    ({"source": "embedded", "path": "my.txt"}, "path"),     # would have calibrated on the embedded text
    ({"source": "embedded", "column": "body"}, "column"),
    ({"source": "files", "path": "my.jsonl", "split": "test"}, "split"),  # files have no splits
    ({"source": "files", "path": "my.jsonl", "dataset": "wikitext"}, "dataset"),
    ({"source": "files", "path": "my.jsonl", "data_files": "a.json"}, "data_files"),
    ({"source": "hub", "dataset": "wikitext", "path": "my.txt"}, "path"),
])
def test_calibration_source_keys_the_source_does_not_read_are_refused(text, key):
    msg = _err({"model": "m", "output": "o", "calibration": {"text": text}})
    assert "calibration.text" in msg and repr(key) in msg and "does not read" in msg


@pytest.mark.parametrize("section", ["images", "audio"])
def test_media_files_have_no_column(section):
    msg = _err({"model": "m", "output": "o", "calibration": {section: {"source": "files", "path": "d", "column": "x"}}})
    assert f"calibration.{section}" in msg and "'column'" in msg
    r = parse_recipe({"model": "m", "output": "o", "calibration": {section: {"source": "hub", "dataset": "d", "column": "x",
                                                                              "name": "n", "split": "s", "data_files": "f"}}})
    assert getattr(r.calibration, section).column == "x"


@pytest.mark.parametrize("text, key", [
    ({"source": "files", "path": "my.txt", "split": "test"}, "split"),
    ({"source": "embedded", "dataset": "wikitext"}, "dataset"),
    ({"source": "hub", "dataset": "wikitext", "path": "my.txt"}, "path"),
])
def test_eval_text_keys_the_source_does_not_read_are_refused(text, key):
    msg = _err({"model": "m", "output": "o", "eval": {"text": text}})
    assert "eval.text" in msg and repr(key) in msg


def test_bnb_type_needs_the_bitsandbytes_format():
    msg = _err({"model": "m", "output": "o", "exports": {"safetensors": {"format": "compressed-tensors", "bnb": "fp4"}}})
    assert "exports.safetensors" in msg and "bnb" in msg and "bitsandbytes" in msg
    r = parse_recipe({"model": "m", "output": "o", "exports": {"safetensors": {"format": "bitsandbytes", "bnb": "fp4"}}})
    assert r.exports.safetensors.bnb == "fp4"


@pytest.mark.parametrize("extra", [{"context": 8192}, {"vision": True}])
def test_fit_budget_refuses_the_device_only_keys(extra):
    """context and vision size what shares a device's memory; with a byte budget they would be ignored."""
    fit = {"budget": "4.5bpw", **extra}
    msg = _err({"model": "m", "output": "o", "exports": {"gguf": {"fit": fit}}})
    assert "exports.gguf.fit" in msg and next(iter(extra)) in msg and "'device'" in msg
    r = parse_recipe({"model": "m", "output": "o", "exports": {"gguf": {"fit": {"device": "phone-6gb", **extra}}}})
    assert getattr(r.exports.gguf.fit, next(iter(extra))) == extra[next(iter(extra))]


def test_compute_dtype_lists_the_valid_ones():
    with pytest.raises(RecipeError) as err:
        parse_recipe({"model": "m", "output": "o", "compute_dtype": "float16"}, "r.yaml")
    msg = str(err.value)
    assert msg.startswith("r.yaml: compute_dtype:") and "'float32'" in msg and "'bfloat16'" in msg and "'auto'" in msg
    assert parse_recipe({"model": "m", "output": "o"}).compute_dtype == "float32"
    assert parse_recipe({"model": "m", "output": "o", "compute_dtype": "auto"}).compute_dtype == "auto"
