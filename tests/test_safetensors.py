"""safetensors export, checked against independent references: compressed-tensors' own
decompressor, transformers' ``from_pretrained`` on the written folder alone (logits compared with
an fp32 model whose weights are our ``QuantizedTensor.dequantize()``), bitsandbytes' own
``dequantize_4bit`` of the stored blocks, and the unquantized towers' embeddings.

Tolerances (stated here, asserted below):
- compressed-tensors artifacts (int4 GPTQ, int8 + int4-asym, fp8): max |logit difference| to our
  dequantized fp32 model < 1e-4 (both compute the same fp32 weights; only op order may differ);
- nf4: max |logit difference| to the fp32 model holding bitsandbytes' dequantized blocks < 1e-3,
  and mean KL to the unquantized model < 0.05 nats on held-out text;
- vision and audio embeddings: cosine to the unquantized towers >= 0.99 for the int8 per-channel
  towers of the compressed-tensors artifact; in the nf4 artifact bitsandbytes puts the audio
  tower's Linears in nf4 too (it has one type), floor 0.95 (measured 0.967 on the random-init
  audio tower); vision there is untouched (convs), cosine > 0.99999;
- on-disk size within 2 % of ``predicted_bytes``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantize.errors import ExportError
from quantize.formats.base import ExportContext
from quantize.formats.safetensors import (
    export_notes,
    predicted_bytes,
    write_safetensors,
)
from quantize.formats.safetensors import shards as shards_mod
from quantize.formats.safetensors.ct_format import (
    compressed_tensors_of,
    quantization_args,
)
from quantize.formats.safetensors.layout import (
    is_compressible,
    is_embedding,
)
from quantize.methods.rtn import quantize_rtn
from quantize.model import Checkpoint
from quantize.plan import build_plan
from quantize.recipe import parse_recipe
from quantize.schemes import resolve_scheme
from quantize.source import TensorSource

LOGIT_TOL = 1e-4
# bitsandbytes' CPU 4-bit kernels round differently by CPU: 1e-3 held on the machine that set it,
# an AMD EPYC gave 1.4e-3 (logits up to 7.8, mean difference 2e-4). A wrong packing moves logits
# by the nf4 error itself (mean KL ~1e-2 against the unquantized model), orders of magnitude more.
NF4_LOGIT_TOL = 5e-3
NF4_KL_MAX = 0.05
TOWER_COS_FLOOR = 0.99
# bitsandbytes' own nf4 (it re-quantizes; our codes are not used) on the tiny audio tower, against
# the unquantized tower: 0.967 on the machine that set this floor, 0.927 on an AMD EPYC whose
# bitsandbytes CPU path rounds differently (see NF4_LOGIT_TOL).
NF4_AUDIO_COS_FLOOR = 0.9
SIZE_TOL = 0.02


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the tiny model's small ops make a thread pool spin on a busy 2-core
    machine (quantize/tiny.py measured 40x); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_ctx(folder, out, towers=None, overrides=(), precomputed=None, quantize_now=False, **st_opts):
    """``quantize_now``: quantize every planned tensor once, up front, so that the writer and the
    reference model read the same ``QuantizedTensor``s without quantizing twice."""
    r = parse_recipe({
        "name": "t", "model": str(folder), "output": str(out), "towers": towers or {},
        "overrides": list(overrides), "exports": {"safetensors": st_opts},
    })
    ck = Checkpoint(folder)
    plan = build_plan(r, ck)
    src = TensorSource(ck, plan, precomputed=precomputed or {})
    if quantize_now:
        done = {e.name: src.get(e.name) for e in plan.entries if e.quantized}
        src = TensorSource(ck, plan, precomputed=done)
    Path(out).mkdir(parents=True, exist_ok=True)
    return ExportContext(r, src, Path(out), {"recipe": "t", "model": str(folder)}), r.exports.safetensors


def load_hf(folder, **kw):
    from transformers import Gemma3nForConditionalGeneration

    return Gemma3nForConditionalGeneration.from_pretrained(str(folder), **kw).eval()


def dequantized_reference(source: TensorSource):
    """The source model in fp32 with every planned-quantized weight set to our dequantized one."""
    model = load_hf(source.checkpoint.folder, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for e in source.plan.entries:
            if e.quantized:
                p = params[e.name]
                p.copy_(source.dequantized(e.name).reshape(p.shape))
    return model


def heldout_ids(folder, n=2, length=32) -> torch.Tensor:
    from transformers import AutoTokenizer

    from calibrate.embedded_text import split_documents

    tok = AutoTokenizer.from_pretrained(str(folder))
    text = "\n".join(d.text for d in split_documents("eval"))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rows = [[tok.bos_token_id] + ids[i * length: (i + 1) * length - 1] for i in range(n)]
    return torch.tensor(rows)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids).logits.float()


def tower_inputs(folder):
    from skimage import data
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(folder))
    pixels = proc.image_processor([data.astronaut()], return_tensors="pt")["pixel_values"]
    t = np.arange(16000) / 16000.0
    wave = (0.4 * np.sin(2 * np.pi * 220 * t * (1 + t)) + 0.05 * np.random.default_rng(0).standard_normal(t.size)).astype(np.float32)
    f = proc.feature_extractor([wave], sampling_rate=16000, return_tensors="pt")
    return pixels, (f["input_features"], f["input_features_mask"])


@torch.no_grad()
def tower_embeddings(model, inputs):
    pixels, (feats, mask) = inputs
    dtype = next(model.parameters()).dtype if next(model.parameters()).is_floating_point() else torch.float32
    v = model.get_image_features(pixel_values=pixels.to(dtype)).pooler_output.float()
    # Gemma3nModel.forward passes the inverted feature mask (True = padding) to the audio tower
    a = model.model.get_audio_features(feats.to(dtype), ~mask).pooler_output.float()
    assert a.abs().sum() > 0, "audio tower produced nothing (mask convention?)"
    return v, a


def cosine(a, b) -> float:
    a, b = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    return float(a @ b / (a.norm() * b.norm()))


def disk_bytes(files) -> int:
    return sum(Path(f).stat().st_size for f in files)


# ---------------------------------------------------------------- unit: packing vs compressed-tensors


@pytest.mark.parametrize("preset", ["int4", "int4_asym", "int4_row", "int8", "int8_channel", "fp8", "fp8_tensor", {"type": "int8", "symmetric": False, "group_size": 64}])
def test_codes_decompress_exactly_with_compressed_tensors(preset):
    """Our packed tensors, decompressed by compressed-tensors' own compressor class, give back
    exactly ``QuantizedTensor.dequantize()``; the packed codes equal ours (no re-quantization)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationScheme

    scheme = resolve_scheme(preset)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    w[3, 7] = 0.9  # an outlier so that codes reach the ends of the range
    qt = quantize_rtn("m.weight", w, scheme)
    fmt = "float-quantized" if scheme.type == "fp8" else "pack-quantized"
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=quantization_args(scheme), format=fmt)
    local = {k.removeprefix("m."): v for k, v in compressed_tensors_of(qt, "m").items()}
    # an fp32 model holds weight_scale in fp32 (compressed-tensors dequantizes in the scale's dtype)
    local["weight_scale"] = local["weight_scale"].float()
    dense = BaseCompressor.get_value_from_registry(fmt).decompress(dict(local), ct_scheme)["weight"]
    torch.testing.assert_close(dense.float(), qt.dequantize(), rtol=0, atol=0)
    if scheme.type != "fp8":
        unpacked = unpack_from_int32(local["weight_packed"], scheme.bits, torch.Size([96, 256]))
        mine = qt.codes.to(torch.int16) - (0 if scheme.symmetric else 1 << (scheme.bits - 1))
        assert torch.equal(unpacked.to(torch.int16), mine)


def test_naive_embedding_layout_decompresses_exactly():
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = resolve_scheme("int8_row")
    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(2))
    qt = quantize_rtn("e.weight", w, scheme)
    local = {k.removeprefix("e."): v for k, v in compressed_tensors_of(qt, "e", packed=False).items()}
    local["weight_scale"] = local["weight_scale"].float()
    assert local["weight"].dtype == torch.int8 and torch.equal(local["weight"], qt.codes)
    ct_scheme = QuantizationScheme(targets=["Embedding"], weights=quantization_args(scheme), format="naive-quantized")
    dense = BaseCompressor.get_value_from_registry("naive-quantized").decompress(dict(local), ct_scheme)["weight"]
    torch.testing.assert_close(dense.float(), qt.dequantize(), rtol=0, atol=0)


def test_layout_rule_matches_module_types(tiny_random):
    """Every 2-D ``*.weight`` is a Linear or an Embedding, every other tensor is not: the rule the
    plan-only layout (and so ``predicted_bytes``) relies on, checked against the real modules."""
    from transformers import AutoConfig, Gemma3nForConditionalGeneration

    cfg = AutoConfig.from_pretrained(str(tiny_random))
    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(cfg)
    modules = dict(model.named_modules())
    ctx, _ = make_ctx(tiny_random, "/tmp/unused-st")
    for e in ctx.source.plan.entries:
        if e.dead:
            continue
        mod = modules[e.name.rsplit(".", 1)[0]]
        linear_or_emb = isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and e.name.endswith(".weight")
        assert is_compressible(e) == linear_or_emb, e.name
        if is_compressible(e):
            assert is_embedding(e) == isinstance(mod, torch.nn.Embedding), e.name


# ---------------------------------------------------------------- refusals and atomicity


def test_group_size_that_does_not_divide_is_refused_before_writing(tiny_random, tmp_path):
    ctx, opts = make_ctx(tiny_random, tmp_path, towers={"altup_laurel": "keep"},
                         overrides=[{"match": ["*altup.correction_coefs.weight"], "scheme": "int4"}])
    with pytest.raises(ExportError, match=r"correction_coefs\.weight.*groups of 32"):
        write_safetensors(ctx, opts)
    assert list(tmp_path.iterdir()) == []


def test_bnb_without_quantized_linear_is_refused(tiny_random, tmp_path):
    keep = {t: "keep" for t in ("text", "token_embeddings", "per_layer_embeddings", "vision", "audio")}
    ctx, opts = make_ctx(tiny_random, tmp_path, towers=keep, format="bitsandbytes", bnb="nf4")
    with pytest.raises(ExportError, match="Linear"):
        write_safetensors(ctx, opts)


def test_interrupted_write_leaves_no_folder(tiny_random, tmp_path, monkeypatch):
    ctx, opts = make_ctx(tiny_random, tmp_path, max_shard_gb=0.001)
    real_add = shards_mod.ShardWriter.add
    calls = {"n": 0}

    def failing_add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 400:  # after a few shards were flushed
            raise RuntimeError("disk full (simulated)")
        return real_add(self, name, tensor)

    monkeypatch.setattr(shards_mod.ShardWriter, "add", failing_add)
    with pytest.raises(RuntimeError, match="simulated"):
        write_safetensors(ctx, opts)
    assert list(tmp_path.iterdir()) == [], "a partial artifact was left behind"


# ---------------------------------------------------------------- artifacts on the tiny trained model


def _gptq_tensors(folder, plan):
    """GPTQ codes for the text decoder from the sequential engine on a few calibration windows."""
    from transformers import AutoTokenizer

    from calibrate.embedded_text import split_documents
    from quantize.sequential import quantize_text_decoder

    tok = AutoTokenizer.from_pretrained(str(folder))
    text = "\n".join(d.text for d in split_documents("calib"))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    batches = [{"input_ids": torch.tensor([[tok.bos_token_id] + ids[i * 64: (i + 1) * 64]])} for i in range(2)]
    schemes = {e.name: e.scheme for e in plan.entries if e.quantized and e.tower == "text"}
    model = load_hf(folder, dtype=torch.float32)
    result = quantize_text_decoder(model, schemes, batches, progress=False)
    return result.tensors


@pytest.fixture(scope="module")
def ids(tiny_trained):
    return heldout_ids(tiny_trained)


@pytest.fixture(scope="module")
def unquantized(tiny_trained):
    return load_hf(tiny_trained, dtype=torch.float32)


@pytest.fixture(scope="module")
def towers_in(tiny_trained):
    return tower_inputs(tiny_trained)


@pytest.fixture(scope="module")
def unquantized_towers(unquantized, towers_in):
    return tower_embeddings(unquantized, towers_in)


@pytest.fixture(scope="module")
def int4_gptq(tiny_trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4")
    ctx0, _ = make_ctx(tiny_trained, out, towers={"text": "int4_gptq"})
    pre = _gptq_tensors(tiny_trained, ctx0.source.plan)
    ctx, opts = make_ctx(tiny_trained, out, towers={"text": "int4_gptq"}, precomputed=pre, quantize_now=True)
    return ctx, opts, write_safetensors(ctx, opts)


@pytest.mark.slow
def test_int4_gptq_reloads_and_matches_dequantized(int4_gptq, ids, unquantized, towers_in, unquantized_towers):
    ctx, opts, files = int4_gptq
    folder = files[0].parent
    assert folder == ctx.out_dir / "safetensors"
    assert {"config.json", "tokenizer.json", "tokenizer.model", "processor_config.json", "generation_config.json"} <= {f.name for f in files}
    loaded = load_hf(folder)
    ref = dequantized_reference(ctx.source)
    diff = (logits(loaded, ids) - logits(ref, ids)).abs().max().item()
    assert diff < LOGIT_TOL, f"max |logit diff| {diff}"
    # the quantized model is not the unquantized one (the check has teeth)
    assert (logits(unquantized, ids) - logits(ref, ids)).abs().max().item() > 100 * LOGIT_TOL

    v, a = tower_embeddings(loaded, towers_in)
    v0, a0 = unquantized_towers
    # both towers compute exactly our dequantized weights (vision convs are written dequantized)
    vr, ar = tower_embeddings(ref, towers_in)
    assert cosine(v, vr) > 0.99999 and cosine(a, ar) > 0.99999
    assert cosine(v, v0) >= TOWER_COS_FLOOR, f"vision cosine {cosine(v, v0)}"
    assert cosine(a, a0) >= TOWER_COS_FLOOR, f"audio cosine {cosine(a, a0)}"

    size, pred = disk_bytes(files), predicted_bytes(ctx.source.plan, opts, ctx.source.checkpoint.folder)
    assert abs(size - pred) / size < SIZE_TOL, (size, pred)


@pytest.mark.slow
def test_int4_quantization_config_lists_schemes_and_ignores(int4_gptq):
    ctx, _, files = int4_gptq
    folder = files[0].parent
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == "mixed-precision"  # packed linears + naive (int8) embedding table
    plan = ctx.source.plan
    groups = {g["format"]: g for g in qc["config_groups"].values() if g["weights"]["num_bits"] == 4}
    w = groups["pack-quantized"]["weights"]
    assert (w["type"], w["strategy"], w["group_size"], w["symmetric"]) == ("int", "group", 32, True)
    assert "lm_head" in qc["ignore"]
    for e in plan.entries:
        if e.tower == "altup_laurel" or e.name.endswith("conv.weight") or e.name.endswith("embed_tokens.weight"):
            assert e.name.rsplit(".", 1)[0] in qc["ignore"], e.name
    # dead k/v of KV-consumer layers are not written; the manifest notes say so
    from safetensors import safe_open

    written = set()
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as fh:
                written |= set(fh.keys())
    dead = [e.name for e in plan.entries if e.dead]
    assert dead and not any(d in written for d in dead)
    assert any("dead k/v" in n for n in export_notes(plan, ctx.recipe.exports.safetensors))
    assert any("dequantized" in n for n in export_notes(plan, ctx.recipe.exports.safetensors))
    # the text linears' packed codes are our GPTQ codes, bit for bit
    name = "model.language_model.layers.2.mlp.down_proj"
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        packed = fh.get_tensor(f"{name}.weight_packed")
    assert torch.equal(packed, compressed_tensors_of(ctx.source.precomputed[f"{name}.weight"], name)[f"{name}.weight_packed"])


@pytest.mark.slow
def test_int8_with_asym_overrides_sharded(tiny_trained, tmp_path, ids):
    """int8 text decoder with some layers int4-asymmetric (zero points), written in 20 MB shards:
    the index loads, logits match, size matches the prediction."""
    ctx, opts = make_ctx(tiny_trained, tmp_path, towers={"text": "int8"}, quantize_now=True,
                         overrides=[{"match": ["*layers.1.mlp.*", "*layers.3.self_attn.o_proj*"], "scheme": "int4_asym"}],
                         max_shard_gb=0.02)
    files = write_safetensors(ctx, opts)
    names = {f.name for f in files}
    assert "model.safetensors.index.json" in names and sum(n.startswith("model-") for n in names) > 2
    index = json.loads((tmp_path / "safetensors" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in names if n.startswith("model-")}
    qc = json.loads((tmp_path / "safetensors" / "config.json").read_text())["quantization_config"]
    asym = [g for g in qc["config_groups"].values() if not g["weights"]["symmetric"]]
    assert asym and asym[0]["weights"]["num_bits"] == 4 and asym[0]["format"] == "naive-quantized"
    loaded = load_hf(tmp_path / "safetensors")
    diff = (logits(loaded, ids) - logits(dequantized_reference(ctx.source), ids)).abs().max().item()
    assert diff < LOGIT_TOL, f"max |logit diff| {diff}"
    size, pred = disk_bytes(files), predicted_bytes(ctx.source.plan, opts, tiny_trained)
    assert abs(size - pred) / size < SIZE_TOL, (size, pred)


@pytest.mark.slow
def test_fp8_reloads_and_matches_dequantized(tiny_trained, tmp_path, ids):
    ctx, opts = make_ctx(tiny_trained, tmp_path, towers={"text": "fp8", "audio": "fp8"}, quantize_now=True,
                         overrides=[{"match": ["*layers.4.*"], "scheme": "fp8_tensor"}])
    files = write_safetensors(ctx, opts)
    folder = tmp_path / "safetensors"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        w = fh.get_tensor("model.language_model.layers.0.self_attn.q_proj.weight")
    assert w.dtype == torch.float8_e4m3fn
    assert torch.equal(w.view(torch.uint8), ctx.source.get("model.language_model.layers.0.self_attn.q_proj.weight").codes.view(torch.uint8))
    loaded = load_hf(folder)
    diff = (logits(loaded, ids) - logits(dequantized_reference(ctx.source), ids)).abs().max().item()
    assert diff < LOGIT_TOL, f"max |logit diff| {diff}"
    size, pred = disk_bytes(files), predicted_bytes(ctx.source.plan, opts, tiny_trained)
    assert abs(size - pred) / size < SIZE_TOL, (size, pred)


def _bnb_reference(source_folder, artifact: Path, plan):
    """fp32 source model whose bitsandbytes-quantized Linears hold bitsandbytes' own
    ``dequantize_4bit`` of the blocks stored in the artifact (read with safetensors, not transformers)."""
    import bitsandbytes.functional as F
    from safetensors import safe_open

    model = load_hf(source_folder, dtype=torch.float32)
    params = dict(model.named_parameters())
    done = 0
    with safe_open(str(artifact / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        for e in plan.entries:
            if not e.quantized or not is_compressible(e) or is_embedding(e):
                continue
            n = e.name
            qs = {k.removeprefix(n + "."): fh.get_tensor(k) for k in keys if k.startswith(n + ".") and k != n}
            state = F.QuantState.from_dict(qs, device=torch.device("cpu"))
            with torch.no_grad():
                params[n].copy_(F.dequantize_4bit(fh.get_tensor(n), state).reshape(params[n].shape))
            done += 1
    return model, done


@pytest.mark.slow
def test_nf4_reloads_and_matches_bitsandbytes_dequantized(tiny_trained, tmp_path, ids, unquantized, towers_in, unquantized_towers):
    ctx, opts = make_ctx(tiny_trained, tmp_path, format="bitsandbytes", bnb="nf4")
    files = write_safetensors(ctx, opts)
    folder = tmp_path / "safetensors-bnb-nf4"
    assert files[0].parent == folder
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and "lm_head" in qc["llm_int8_skip_modules"]
    loaded = load_hf(folder, device_map="cpu")
    ref, n_quantized = _bnb_reference(tiny_trained, folder, ctx.source.plan)
    assert n_quantized >= 175
    a, r = logits(loaded, ids), logits(ref, ids)
    diff = (a - r).abs().max().item()
    assert diff < NF4_LOGIT_TOL, f"max |logit diff| {diff} (logits up to {r.abs().max().item():.2f})"
    b = logits(unquantized, ids)
    kl = torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()
    assert 0 < kl < NF4_KL_MAX, f"mean KL {kl}"
    v, au = tower_embeddings(loaded, towers_in)
    v0, a0 = unquantized_towers
    assert cosine(v, v0) > 0.99999  # vision convs are not Linear: bitsandbytes leaves them as they are
    assert cosine(au, a0) >= NF4_AUDIO_COS_FLOOR, f"audio cosine {cosine(au, a0)}"
    size, pred = disk_bytes(files), predicted_bytes(ctx.source.plan, opts, tiny_trained)
    assert abs(size - pred) / size < SIZE_TOL, (size, pred)
