"""fp8 KV-cache scales (``kv_cache.fp8``) end to end: where they are written, what they equal,
and the recipes that are refused because nothing could hold them.

References: compressed-tensors' own config model and safetensors' reader for what was written;
the keys and values that transformers' forward of the exported (quantized) folder caches, for
the hand-computed ``amax / 448``; transformers' own KV-sharing modes for which layer reads
whose cache; gguf-py for the GGUF.
"""
import json
import subprocess
import sys

import pytest
import torch

from quantize.recipe import parse_recipe

LAYERS = "model.language_model.layers"
KEEP = {t: "keep" for t in ("token_embeddings", "per_layer_embeddings", "vision", "audio")}
# Text only, windows shorter than the tiny model's sliding window (64), so transformers' cache
# keeps every token a sliding layer computed, as the calibration pass saw them.
CALIBRATION = {
    "text": {"source": "embedded", "n_samples": 3, "seq_len": 48},
    "images": {"source": "embedded", "n_samples": 0},
    "audio": {"source": "embedded", "n_samples": 0},
    "multimodal_samples": 0,
}


def _kv(layer, leaf):
    return f"{LAYERS}.{layer}.self_attn.{leaf}.weight"


def _recipe(model, out, **extra):
    return parse_recipe({
        "model": str(model), "output": str(out), "seed": 0,
        "calibration": CALIBRATION,
        "towers": {"text": "int4", **KEEP},
        # K and V of the producer of the sliding group differ: the engine and writers take it.
        "overrides": [
            {"match": [_kv(18, "k_proj")], "scheme": "int8"},
            {"match": [_kv(18, "v_proj")], "scheme": "int4"},
        ],
        "kv_cache": {"fp8": True},
        **extra,
    })


@pytest.fixture(scope="module")
def kv_run(tiny_random, tmp_path_factory):
    from quantize.pipeline import run

    out = tmp_path_factory.mktemp("kv") / "out"
    recipe = _recipe(tiny_random, out, exports={
        "gguf": {"mix": "auto", "mmproj": False}, "safetensors": {"format": "compressed-tensors"},
    })
    return recipe, run(recipe, progress=False)


def _stored_scales(folder):
    from safetensors import safe_open

    out = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if name.endswith(("self_attn.k_scale", "self_attn.v_scale")):
                out[name] = f.get_tensor(name)
    return out


def _cached_kv_amax(model, batches):
    """Per layer that keeps a cache: max |keys| and max |values| transformers caches over the batches."""
    amax: dict[int, list[float]] = {}
    with torch.no_grad():
        for ids in batches:
            cache = model(input_ids=ids, use_cache=True).past_key_values
            for i, layer in enumerate(cache.layers):
                if layer.keys is None:  # a KV-consumer layer: it keeps nothing of its own
                    continue
                a = amax.setdefault(i, [0.0, 0.0])
                a[0] = max(a[0], float(layer.keys.abs().max()))
                a[1] = max(a[1], float(layer.values.abs().max()))
    return amax


def test_scales_written_where_compressed_tensors_and_vllm_read_them(kv_run, tiny_random):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoConfig, AutoProcessor, Gemma3nForConditionalGeneration

    from calibrate import build_calibration

    recipe, result = kv_run
    folder = result.out_dir / "safetensors"
    qc = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    kv = qc.kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.strategy, kv.dynamic, kv.symmetric) == (8, "float", "tensor", False, True)

    tc = AutoConfig.from_pretrained(tiny_random).text_config
    n = tc.num_hidden_layers
    stored = _stored_scales(folder)
    assert sorted(stored) == sorted(f"{LAYERS}.{i}.self_attn.{s}" for i in range(n) for s in ("k_scale", "v_scale"))
    assert all(t.shape == (1,) and t.dtype == torch.float32 for t in stored.values())

    # Hand-computed: amax / 448 of what the quantized model (loaded by transformers from the
    # artifact) caches on the calibration text.
    calib = build_calibration(recipe.calibration, AutoProcessor.from_pretrained(str(tiny_random)), seed=recipe.seed)
    model = Gemma3nForConditionalGeneration.from_pretrained(str(folder)).eval()
    amax = _cached_kv_amax(model, calib.text)
    modes, types = tc.kv_sharing_modes, tc.layer_types
    owner = {}
    for i in range(n):
        if modes[i] == "reuse":  # the last earlier "store" layer of the same attention type
            owner[i] = max(j for j in range(i) if modes[j] == "store" and types[j] == types[i])
        else:
            owner[i] = i
    assert set(amax) == {i for i in range(n) if modes[i] != "reuse"}
    for i in range(n):
        k_amax, v_amax = amax[owner[i]]
        k = float(stored[f"{LAYERS}.{i}.self_attn.k_scale"])
        v = float(stored[f"{LAYERS}.{i}.self_attn.v_scale"])
        assert k == pytest.approx(k_amax / 448, rel=1e-6), f"layer {i} k_scale"
        assert v == pytest.approx(v_amax / 448, rel=1e-6), f"layer {i} v_scale"
    # The check has teeth: the float model's caches give other scales (measured: 2.6% on layer 18's K).
    float_amax = _cached_kv_amax(Gemma3nForConditionalGeneration.from_pretrained(str(tiny_random)).eval(), calib.text)
    assert abs(float_amax[18][0] - amax[18][0]) > 1e-3 * amax[18][0]
    # The manifest records the same per-layer scales.
    recorded = result.manifest["kv_cache_scales"]
    assert sorted(map(int, recorded)) == list(range(n))
    for i in range(n):
        k, v = recorded[str(i)]
        assert (k, v) == pytest.approx((float(stored[f"{LAYERS}.{i}.self_attn.k_scale"]), float(stored[f"{LAYERS}.{i}.self_attn.v_scale"])))


def test_transformers_loads_the_folder_and_computes_the_fake_quantized_model(kv_run, tiny_random):
    """transformers 5.24 with compressed-tensors 0.20.1 applies ``kv_cache_scheme`` only to
    attention modules whose forward takes ``past_key_values`` (``is_cached_attention_module``);
    Gemma 3n's takes ``cache``, so transformers computes an unquantized cache and leaves the
    scales unused (README). If this starts to fail, transformers does apply the scheme: check
    that its ``k_scale`` / ``v_scale`` parameters equal the stored ones and update the README."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module
    from transformers import Gemma3nForConditionalGeneration

    from quantize.methods.rtn import quantize_rtn
    from quantize.model import Checkpoint
    from quantize.plan import build_plan

    recipe, result = kv_run
    q = Gemma3nForConditionalGeneration.from_pretrained(str(result.out_dir / "safetensors")).eval()
    attn = q.model.language_model.layers[18].self_attn
    assert not is_cached_attention_module(attn) and not hasattr(attn, "k_scale")

    # The fake-quantized model: the source with every planned text weight replaced by its RTN
    # dequantized value (K int8, V int4 in layer 18, as planned).
    plan = build_plan(recipe, Checkpoint(tiny_random))
    assert plan[_kv(18, "k_proj")].scheme.type == "int8" and plan[_kv(18, "v_proj")].scheme.type == "int4"
    ref = Gemma3nForConditionalGeneration.from_pretrained(str(tiny_random)).eval()
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for e in plan.entries:
            if e.quantized and e.tower == "text":
                w = params[e.name]
                w.copy_(quantize_rtn(e.name, w.detach().clone(), e.scheme).dequantize())
        ids = torch.arange(3, 67).reshape(1, -1)
        lq, lr = q(input_ids=ids).logits, ref(input_ids=ids).logits
    # Measured: identical (the fake-quantized model differs from the float one by up to 1.9 in logits).
    assert torch.allclose(lq, lr, atol=1e-5, rtol=0), float((lq - lr).abs().max())


def test_gguf_notes_that_it_has_no_kv_scales(kv_run):
    from gguf import GGUFReader

    from quantize.kv_cache import GGUF_KV_NOTE

    _, result = kv_run
    assert GGUF_KV_NOTE in result.manifest["notes"]
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(next(result.out_dir.glob("*.gguf")))).tensors}
    assert types["blk.18.attn_k.weight"] == "Q8_0" and types["blk.18.attn_v.weight"] == "Q4_0"


@pytest.mark.parametrize(
    "exports, needle",
    [
        ("{gguf: {mix: auto, mmproj: false}}", "only GGUF"),
        ("{safetensors: {format: bitsandbytes, bnb: nf4}}", "bitsandbytes has no KV-cache scheme"),
    ],
    ids=["gguf-only", "bitsandbytes"],
)
def test_kv_fp8_without_a_place_for_the_scales_is_refused(tmp_path, tiny_random, exports, needle):
    out = tmp_path / "out"
    body = f"model: {tiny_random}\noutput: {out}\nkv_cache: {{fp8: true}}\nexports: {exports}\n"
    (tmp_path / "r.yaml").write_text(body)
    r = subprocess.run([sys.executable, "-m", "quantize", "run", str(tmp_path / "r.yaml")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "kv_cache.fp8" in lines[0] and needle in lines[0], r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))
