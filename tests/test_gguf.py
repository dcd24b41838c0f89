"""GGUF export, checked against independent references: ``gguf``'s reference (de)quantizers and
tensor-name map, ``GGUFReader`` on the written file, and hand-built configs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader, TokenType, quants as gq

from quantize.errors import ExportError
from quantize.formats.base import ExportContext
from quantize.formats.gguf import blocks, kquants, mixes, write_gguf
from quantize.formats.gguf.names import TEXT_RULES, VISION_RULES, map_name
from quantize.formats.gguf.writer import plan_text
from quantize.llamacpp_layout import check_layout, validate_layout
from quantize.methods.rtn import quantize_rtn
from quantize.model import Checkpoint
from quantize.plan import build_plan
from quantize.recipe import parse_recipe
from quantize.schemes import resolve_scheme
from quantize.source import TensorSource

KEEP_ALL = {"text": "keep", "token_embeddings": "keep", "per_layer_embeddings": "keep", "vision": "keep", "audio": "keep"}


def make_ctx(folder, out, mix="F32", towers=None, mmproj=False, force=False, precomputed=None, importance=None,
             overrides=(), **gguf_opts):
    r = parse_recipe({
        "name": "t", "model": str(folder), "output": str(out), "towers": towers or KEEP_ALL, "overrides": list(overrides),
        "exports": {"gguf": {"mix": mix, "mmproj": mmproj, "force": force, **gguf_opts}},
    })
    ck = Checkpoint(folder)
    plan = build_plan(r, ck)
    src = TensorSource(ck, plan, precomputed=precomputed or {}, importance=importance or {})
    return ExportContext(r, src, Path(out), {"recipe": "t", "model": str(folder)}), r.exports.gguf


# ---------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("preset,qtype", [
    ("int4", T.Q4_0), ("int4_g128", T.Q4_0), ("int4_row", T.Q4_0),
    ("int8", T.Q8_0), ("int8_row", T.Q8_0), ("int4_asym", T.Q4_1),
])
def test_exact_packing_decodes_to_our_dequantized_weights(preset, qtype):
    torch.manual_seed(0)
    w = torch.randn(24, 256) * 0.05
    w[3] = 0  # an all-zero row (scale 0)
    qt = quantize_rtn("w", w, resolve_scheme(preset))
    assert blocks.exact_type(qt) == qtype
    raw = blocks.pack_exact(qt, qtype)
    assert raw.shape == (24, blocks.row_bytes(qtype, 256))
    decoded = gq.dequantize(raw, qtype)  # gguf's reference dequantizer
    ours = qt.dequantize().numpy()
    if qtype == T.Q4_1:
        # m = -scale * zero is stored in fp16: off by at most half an fp16 ulp of m
        m = (qt.scales.float() * qt.zero_points.float()).numpy()
        tol = np.repeat(np.abs(m) * 2.0**-11, qt.group_size, axis=1) + 1e-12
        assert np.all(np.abs(decoded - ours) <= tol)
    else:
        np.testing.assert_array_equal(decoded, ours)


def test_exact_type_refuses_what_blocks_cannot_hold():
    w = torch.randn(4, 48)
    assert blocks.exact_type(quantize_rtn("w", w, resolve_scheme("int8_row"))) is None  # 48 columns
    fp8 = quantize_rtn("w", torch.randn(4, 64), resolve_scheme("fp8"))
    assert blocks.exact_type(fp8) is None
    with pytest.raises(ValueError, match="without re-quantizing"):
        blocks.pack_exact(fp8, T.Q8_0)


def _rel_err(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


# Q2_K / Q3_K (2.6 / 3.4 bits per weight) have no legacy type of as few bits: bounds on their
# relative error instead (measured 0.26 / 0.15; Q4_0 is 0.13 on these weights).
@pytest.mark.parametrize("qtype,legacy", [(T.Q2_K, 0.3), (T.Q3_K, 0.17), (T.Q4_K, T.Q4_0), (T.Q5_K, T.Q5_0), (T.Q6_K, T.Q8_0)])
def test_kquant_encoder_against_gguf_dequantizer(qtype, legacy):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((32, 512)) * 0.02).astype(np.float32)
    w[:, 7] *= 20  # an outlier column
    w[5] = 0  # all zeros
    w[6] = 0.013  # constant row
    raw = kquants.encode_kquant(w, qtype)
    assert raw.shape == (32, 2 * kquants.BYTES[qtype])
    dec = gq.dequantize(raw, qtype)
    np.testing.assert_array_equal(dec[5], 0)
    np.testing.assert_allclose(dec[6], 0.013, rtol=2e-2)
    # better than the legacy type of the same or more bits, from gguf's own reference quantizer
    if isinstance(legacy, float):
        assert _rel_err(dec, w) < legacy
        return
    ref = gq.dequantize(gq.quantize(w, legacy), legacy)
    if qtype == T.Q6_K:
        assert _rel_err(dec, w) < 0.03
    else:
        assert _rel_err(dec, w) < _rel_err(ref, w)


@pytest.mark.parametrize("qtype", list(kquants.BYTES))
def test_kquant_importance_lowers_error_where_it_matters(qtype):
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 256)) * 0.02).astype(np.float32)
    imp = np.ones(256, np.float32)
    imp[::8] = 1000.0  # one column in eight carries the activations (as an imatrix would say)
    plain = gq.dequantize(kquants.encode_kquant(w, qtype), qtype)
    weighted = gq.dequantize(kquants.encode_kquant(w, qtype, imp), qtype)
    err = lambda d: float(((d - w)[:, ::8] ** 2).mean())  # noqa: E731
    assert err(weighted) < 0.6 * err(plain)


def test_kquant_bad_input_is_refused_by_name():
    w = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="importance has 3 entries for 256 columns"):
        kquants.encode_kquant(w, T.Q4_K, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="finite and non-negative"):
        kquants.encode_kquant(w, T.Q4_K, np.full(256, -1.0, np.float32))
    with pytest.raises(ValueError, match="300 columns do not split into Q6_K blocks of 256"):
        kquants.encode_kquant(np.zeros((2, 300), np.float32), T.Q6_K)
    with pytest.raises(ValueError, match="not Q8_0"):
        kquants.encode_kquant(w, T.Q8_0)


LLAMA_FTYPE = {T.Q2_K: "LLAMA_FTYPE_MOSTLY_Q2_K", T.Q3_K: "LLAMA_FTYPE_MOSTLY_Q3_K_S", T.Q4_K: "LLAMA_FTYPE_MOSTLY_Q4_K_S",
               T.Q5_K: "LLAMA_FTYPE_MOSTLY_Q5_K_S", T.Q6_K: "LLAMA_FTYPE_MOSTLY_Q6_K"}  # whose default type is the key


@pytest.mark.llamacpp
@pytest.mark.parametrize("qtype", list(kquants.BYTES))
def test_kquant_tensors_are_the_bytes_llamacpp_writes(tiny_trained, tmp_path, qtype):
    """Our writer's K-quant tensors against ``llama_model_quantize`` (llama.cpp's own quantizer,
    another call path into ggml: its row chunking, threads and imatrix plumbing) run on our F32
    export, with the same importance vectors as its imatrix for every other tensor."""
    import ctypes

    import llama_cpp

    ctx, opts = make_ctx(tiny_trained, tmp_path / "f32", "F32")
    (f32,) = write_gguf(ctx, opts)
    targets = {t.gguf: t for t in plan_text(ctx, opts).targets}
    rng = np.random.default_rng(3)
    imp = {}  # GGUF name -> importance: half the matrices get one, so both ggml paths are compared
    for i, (name, t) in enumerate(sorted(targets.items())):
        if len(t.shape) == 2 and len(t.sources) == 1 and name.startswith("blk.") and i % 2 == 0:
            imp[name] = np.exp(rng.standard_normal(t.cols)).astype(np.float32)
    ctx, opts = make_ctx(tiny_trained, tmp_path / "ours", "F32", tensor_types=[{"match": ["blk.*"], "type": qtype.name}],
                         importance={targets[n].sources[0]: torch.from_numpy(v) for n, v in imp.items()})
    (ours,) = write_gguf(ctx, opts)

    theirs = tmp_path / "theirs.gguf"
    entries = (llama_cpp.llama_model_imatrix_data * (len(imp) + 1))()
    for e, (name, v) in zip(entries, imp.items()):
        e.name, e.data, e.size = name.encode(), v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = getattr(llama_cpp, LLAMA_FTYPE[qtype])
    params.pure = True  # every quantizable tensor gets the default type: no mix rules
    params.allow_requantize = True  # the shared layers' k/v placeholders are IQ1_S
    params.imatrix = entries
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0

    mine = {t.name: t for t in GGUFReader(ours).tensors}
    compared = {True: 0, False: 0}
    for t in GGUFReader(theirs).tensors:
        if t.tensor_type != qtype or not t.name.startswith("blk.") or not targets[t.name].sources:
            continue  # our rule covers the layers only; placeholders (shared layers' k/v) stay IQ1_S
        assert mine[t.name].tensor_type == qtype, t.name
        assert np.array_equal(np.asarray(mine[t.name].data), np.asarray(t.data)), (t.name, t.name in imp)
        compared[t.name in imp] += 1
    assert min(compared.values()) >= 20, compared  # most of the decoder's matrices, with and without importance


@pytest.mark.slow
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_kquant_weighted_error_no_worse_than_the_numpy_encoder(tiny_trained, qtype):
    """ggml's importance-weighted error against the numpy encoder it replaced, tensor by tensor
    (trained weights of every third layer, heavy-tailed importance vectors)."""
    from safetensors import safe_open

    from kquant_numpy import encode_kquant as numpy_encode  # tests/ is on sys.path (no __init__.py)

    rng = np.random.default_rng(4)
    checked = 0
    with safe_open(str(tiny_trained / "model.safetensors"), framework="np") as f:
        for name in sorted(f.keys()):
            shape = f.get_slice(name).get_shape()
            layer = name.split("layers.")[1].split(".")[0] if ".layers." in name else None
            if ("language_model" not in name or len(shape) != 2 or shape[1] % 256 or "altup" in name or "laurel" in name
                    or layer is None or int(layer) % 3):
                continue  # llama.cpp does not quantize altup / laurel
            w = f.get_tensor(name).astype(np.float32)
            imp = np.exp(2 * rng.standard_normal(shape[1])).astype(np.float32)
            err = lambda raw: float((imp * (gq.dequantize(raw, qtype) - w) ** 2).sum())  # noqa: E731
            assert err(kquants.encode_kquant(w, qtype, imp)) <= err(numpy_encode(w, qtype, imp)), name
            checked += 1
    assert checked >= 20


def test_mixes_follow_llama_cpp_rules():
    n = 35
    ch = lambda name, layer, mix, cols=2048: mixes.choose(name, 2, cols, layer, n, mix, None, "BF16")  # noqa: E731
    assert ch("token_embd.weight", None, "Q4_K_M").qtype == T.Q6_K
    assert ch("token_embd.weight", None, "Q8_0").qtype == T.Q8_0
    assert ch("blk.0.ffn_down.weight", 0, "Q4_K_M").qtype == T.Q6_K  # first eighth: more bits
    assert ch("blk.5.ffn_down.weight", 5, "Q4_K_M").qtype == T.Q4_K
    assert ch("blk.6.attn_v.weight", 6, "Q4_K_M").qtype == T.Q6_K  # (6 - 4) % 3 == 2
    assert ch("blk.5.attn_q.weight", 5, "Q4_K_M").qtype == T.Q4_K
    assert ch("blk.5.attn_q.weight", 5, "Q4_K_M", cols=2080).qtype == T.Q5_0  # llama.cpp's fallback
    assert ch("blk.5.laurel_l.weight", 5, "Q4_K_M").qtype == T.F16  # never quantized by llama.cpp
    assert ch("altup_proj.weight", None, "Q4_0").qtype == T.F16
    # llama.cpp's converter (conversion/base.py) writes the AltUp coefficients F32 for any outtype
    for mix in ("Q4_0", "Q4_K_M", "Q8_0", "F16", "auto"):
        assert ch("blk.3.altup_correct_coef.weight", 3, mix, cols=4).qtype == T.F32, mix
        assert ch("blk.3.altup_predict_coef.weight", 3, mix, cols=4).qtype == T.F32, mix
    gptq = resolve_scheme("int4_gptq")
    c = mixes.choose("blk.1.attn_q.weight", 2, 2048, 1, n, "Q4_0", gptq, "BF16")
    assert c.qtype == T.Q4_0 and c.exact
    c = mixes.choose("blk.1.attn_q.weight", 2, 2048, 1, n, "auto", resolve_scheme("fp8"), "BF16")
    assert c.qtype == T.F16 and "fp8" in c.note


# ---------------------------------------------------------------------------------- names


def test_name_table_covers_the_tiny_checkpoint_and_agrees_with_gguf(tiny_random):
    import gguf

    ck = Checkpoint(tiny_random)
    n = ck.text_config["num_hidden_layers"]
    ref = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3N, n)
    checked = 0
    for name in ck.tensors:
        if "vision_tower" in name or "embed_vision" in name:
            assert map_name(name, VISION_RULES) is not None, name
            continue
        if "audio" in name:
            continue
        m = map_name(name, TEXT_RULES)
        assert m is not None, name
        if m.gguf is None or m.transform == "stack":
            continue
        hf = name.replace("model.language_model.", "model.").removesuffix(".weight")
        theirs = ref.get_name(hf, try_suffixes=(".weight",)) or ref.get_name(hf + ".weight", try_suffixes=(".weight",))
        if theirs is not None:  # gguf's map knows most names; where it does, we must agree
            assert theirs.removesuffix(".weight") == m.gguf.removesuffix(".weight"), name
            checked += 1
    assert checked > 400


def test_text_plan_has_every_tensor_llama_cpp_loads(tiny_random, tmp_path):
    ctx, opts = make_ctx(tiny_random, tmp_path, "Q4_K_M")
    plan = plan_text(ctx, opts)
    names = {t.gguf: t for t in plan.targets}
    tc = ctx.source.config["text_config"]
    for i in range(tc["num_hidden_layers"]):
        for leaf in ("attn_k", "attn_v", "attn_q", "ffn_down", "laurel_l", "altup_router", "inp_gate"):
            assert f"blk.{i}.{leaf}.weight" in names
    assert names["per_layer_token_embd.weight"].shape == (4352, 25 * 256)  # padded from 4096 rows
    assert names["per_layer_token_embd.weight"].pad_rows == 4352 - 4096
    assert names["altup_proj.weight"].shape == (3, 256, 256)
    # KV-shared layers' k/v are zero placeholders in the cheapest type
    ph = names["blk.20.attn_k.weight"]
    assert ph.sources == () and ph.choice.qtype == T.IQ1_S
    assert names["blk.19.attn_k.weight"].sources


# ---------------------------------------------------------------------------------- layout


def test_layout_of_the_tiny_model_matches_llama_cpp(tiny_random):
    assert check_layout(Checkpoint(tiny_random).text_config) == []


def test_layout_mismatch_lists_each_difference(tiny_random):
    tc = dict(Checkpoint(tiny_random).text_config)
    tc["num_kv_shared_layers"] = 4
    tc["laurel_rank"] = 32
    tc["activation_sparsity_pattern"] = [0.95] * 5 + [0.0] * 20
    with pytest.raises(ExportError) as e:
        validate_layout(tc, force=False)
    msg = str(e.value)
    for key in ("num_kv_shared_layers", "laurel_rank", "activation_sparsity_pattern"):
        assert key in msg
    assert "3 mismatch" in msg
    assert len(validate_layout(tc, force=True)) == 3


def _copy_with_config(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_write_refuses_bad_layout_and_force_records_it(tiny_random, tmp_path):
    bad = _copy_with_config(Path(tiny_random), tmp_path / "bad", num_kv_shared_layers=4)
    out = tmp_path / "out"
    ctx, opts = make_ctx(bad, out, "Q8_0")
    with pytest.raises(ExportError, match="num_kv_shared_layers: model has 4"):
        write_gguf(ctx, opts)
    assert not list(out.glob("*")) if out.exists() else True
    ctx, opts = make_ctx(bad, out, "Q8_0", force=True)
    (path,) = write_gguf(ctx, opts)
    r = GGUFReader(path)
    warn = r.fields["quantize.warnings"]
    text = [bytes(warn.parts[i]).decode() for i in warn.data]
    assert any("num_kv_shared_layers" in t for t in text)


# ---------------------------------------------------------------------------------- file


def _field(r: GGUFReader, key: str):
    f = r.fields[key]
    return f.contents()


def test_written_file_metadata_vocab_and_tensors(tiny_random, tmp_path):
    ctx, opts = make_ctx(tiny_random, tmp_path, "F32")
    (path,) = write_gguf(ctx, opts)
    assert path.name == "t-F32.gguf" and not list(tmp_path.glob("*.partial"))
    r = GGUFReader(path)
    assert _field(r, "general.architecture") == "gemma3n"
    assert _field(r, "gemma3n.block_count") == 25
    assert _field(r, "gemma3n.embedding_length_per_layer_input") == 256
    assert _field(r, "gemma3n.attention.sliding_window_pattern")[:5] == [True, True, True, True, False]
    assert _field(r, "tokenizer.ggml.model") == "llama"
    tokens = _field(r, "tokenizer.ggml.tokens")
    types = _field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == 4352
    # independent reference: the HF tokenizer's own vocabulary
    tj = json.loads((Path(tiny_random) / "tokenizer.json").read_text())
    added = {t["id"]: t["content"] for t in tj["added_tokens"]}
    assert tokens[4097] == added[4097] == "<image_soft_token>" and types[4097] == TokenType.CONTROL
    assert tokens[2] == "<bos>" and _field(r, "tokenizer.ggml.bos_token_id") == 2
    assert "start_of_turn" in _field(r, "tokenizer.chat_template")
    assert _field(r, "quantize.source_model") == str(tiny_random)
    assert json.loads(_field(r, "quantize.recipe"))["name"] == "t"
    assert _field(r, "general.file_type") == 0  # ALL_F32
    t = {x.name: x for x in r.tensors}
    emb = t["token_embd.weight"]
    ref = Checkpoint(tiny_random).get("model.language_model.embed_tokens.weight").numpy()
    np.testing.assert_array_equal(np.asarray(emb.data).reshape(ref.shape), ref)
    ple = t["per_layer_token_embd.weight"]
    data = np.asarray(ple.data).reshape(4352, -1)
    np.testing.assert_array_equal(data[4096:], np.broadcast_to(data[0], data[4096:].shape))  # row 0, as transformers reads
    assert t["blk.20.attn_v.weight"].tensor_type == T.IQ1_S
    np.testing.assert_array_equal(gq.dequantize(t["blk.20.attn_v.weight"].data, T.IQ1_S), 0)


def test_gptq_codes_become_q4_0_bit_for_bit(tiny_random, tmp_path):
    from quantize.methods.gptq import gptq_quantize

    ck = Checkpoint(tiny_random)
    name = "model.language_model.layers.3.mlp.down_proj.weight"
    w = ck.get(name).float()
    torch.manual_seed(0)
    x = torch.randn(512, w.shape[1])
    qt = gptq_quantize(name, w, x.T @ x / 512, resolve_scheme("int4_gptq"))
    ctx, opts = make_ctx(tiny_random, tmp_path, "Q4_0", overrides=[{"match": [name], "scheme": "int4_gptq"}], precomputed={name: qt},
                         token_embeddings="Q8_0", per_layer_embeddings="Q8_0")
    (path,) = write_gguf(ctx, opts)
    t = {x.name: x for x in GGUFReader(path).tensors}["blk.3.ffn_down.weight"]
    assert t.tensor_type == T.Q4_0
    np.testing.assert_array_equal(gq.dequantize(t.data, T.Q4_0).reshape(qt.shape), qt.dequantize().numpy())


def test_interrupted_write_leaves_no_gguf(tiny_random, tmp_path, monkeypatch):
    from quantize.formats.gguf import writer

    calls = {"n": 0}
    real = writer.packed_chunks

    def boom(ctx, t, resume=None):
        calls["n"] += 1
        if calls["n"] == 50:
            raise KeyboardInterrupt
        return real(ctx, t, resume)

    monkeypatch.setattr(writer, "packed_chunks", boom)
    ctx, opts = make_ctx(tiny_random, tmp_path, "Q8_0")
    with pytest.raises(KeyboardInterrupt):
        write_gguf(ctx, opts)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["write", "pack"])
def test_failure_while_a_piece_is_written_leaves_no_gguf(tiny_random, tmp_path, monkeypatch, where):
    """Pieces are written on an I/O thread while the next is packed: a write that fails there
    (a full disk), or a packing that fails with a write in flight, fails the run with its own
    error, waits for the write, and leaves nothing behind."""
    from concurrent.futures import ThreadPoolExecutor

    from quantize.formats.gguf import writer

    monkeypatch.setattr(writer, "STREAM_ELEMENTS", 5000)  # the tables in many pieces
    writes = {"n": 0}

    class FailingIO(ThreadPoolExecutor):
        def submit(self, fn, *a, **k):
            def maybe_fail(*a, **k):
                writes["n"] += 1
                if where == "write" and writes["n"] == 30:
                    raise OSError(28, "No space left on device")
                return fn(*a, **k)
            return super().submit(maybe_fail, *a, **k)

    real = writer.packed_chunks

    def chunks(ctx, t, resume=None):
        for i, part in enumerate(real(ctx, t, resume)):
            if where == "pack" and writes["n"] >= 30 and i > 0:
                raise ExportError(f"{t.gguf}: packing failed")
            yield part

    monkeypatch.setattr(writer, "ThreadPoolExecutor", FailingIO)
    monkeypatch.setattr(writer, "packed_chunks", chunks)
    towers = {**KEEP_ALL, "per_layer_embeddings": "int8_row", "token_embeddings": "int4"}
    ctx, opts = make_ctx(tiny_random, tmp_path, "auto", towers=towers, token_embeddings="Q4_0", per_layer_embeddings="Q8_0")
    with pytest.raises(OSError if where == "write" else ExportError, match="No space left" if where == "write" else "packing failed"):
        write_gguf(ctx, opts)
    assert writes["n"] >= 30
    assert list(tmp_path.iterdir()) == []


def test_written_gguf_sha256_needs_no_read_back_and_a_changed_file_is_read(tiny_random, tmp_path, monkeypatch):
    """The writer hashes the bytes as it writes them; the manifest's sha256 of that file is
    then known without reading it, and equals the sum of the bytes on disk. A file changed
    since (another size or time) is read again."""
    import builtins
    import hashlib

    from quantize import manifest

    ctx, opts = make_ctx(tiny_random, tmp_path, "Q8_0")
    (path,) = write_gguf(ctx, opts)
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    got = manifest.sha256_file(path)
    monkeypatch.undo()
    assert got == want and str(path) not in opened
    with open(path, "ab") as f:
        f.write(b"\0")
    assert manifest.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest() != want


def test_mmproj_refuses_text_width_mtmd_cannot_run(tiny_random, tmp_path):
    ctx, opts = make_ctx(tiny_random, tmp_path, "Q8_0", mmproj=True)
    with pytest.raises(ExportError, match="text hidden_size 256 != vision hidden_size 2048"):
        write_gguf(ctx, opts)
    assert list(tmp_path.iterdir()) == []


def test_vision_names_reshape_layer_scales(tiny_random):
    ck = Checkpoint(tiny_random)
    gammas = [n for n in ck.tensors if n.endswith("layer_scale.gamma")]
    assert gammas
    for n in gammas:
        m = map_name(n, VISION_RULES)
        assert m.transform == "gamma4d" and m.gguf.startswith("v.blk.") and m.gguf.endswith("layer_scale.gamma")
    assert map_name("model.embed_vision.embedding_projection.weight", VISION_RULES).gguf == "mm.input_projection.weight"


def test_mmproj_tensors_names_shapes_and_forced_types(tiny_random, tmp_path):
    from quantize.formats.gguf.mmproj import vision_plan

    ctx, opts = make_ctx(tiny_random, tmp_path, "auto", towers={**KEEP_ALL, "vision": "int8_channel"}, mmproj=True)
    plan = vision_plan(ctx, opts)
    t = {x.gguf: x for x in plan.targets}
    ck = Checkpoint(tiny_random)
    blocks_ck = [n for n in ck.tensors if ".timm_model.blocks." in n]
    assert len([n for n in t if n.startswith("v.blk.")]) == len(blocks_ck)
    gamma = next(x for n, x in t.items() if n.endswith("layer_scale.gamma"))
    assert len(gamma.shape) == 4 and gamma.shape[0] == gamma.shape[2] == gamma.shape[3] == 1
    assert t["v.conv_stem.conv.bias"].shape == (1, 64, 1, 1)
    assert t["v.conv_stem.conv.weight"].choice.qtype == T.F32  # the converter forces the stem to F32
    assert t["mm.input_projection.weight"].choice.qtype == T.F16
    assert t["mm.input_projection.weight"].shape == (256, 2048)  # (text, vision): ggml ne[0] is the vision width
    assert t["v.blk.1.0.pw_exp.conv.weight"].choice.qtype == T.F16  # mtmd's conv kernels take F16/F32 only
    assert t["v.blk.1.0.pw_exp.conv.weight"].dequantize  # auto: our int8 weights, not the originals
    assert any("dequantized" in n for n in plan.notes)
    assert not any("audio" in s or "conformer" in s for x in plan.targets for s in x.sources)
    assert plan.path.name == "mmproj-t-f16.gguf"


# ---------------------------------------------------------------------------------- streaming


def test_read_rows_equals_safetensors_own_slices(tiny_random):
    from safetensors import safe_open

    ck = Checkpoint(tiny_random)
    name = next(n for n in ck.tensors if n.endswith("embed_tokens_per_layer.weight"))
    info = ck.tensors[name]
    with safe_open(str(info.file), framework="pt") as f:
        ref = f.get_tensor(name)
    for a, b in ((0, 7), (1000, 1513), (info.shape[0] - 5, info.shape[0] + 10)):
        got = ck.read_rows(name, a, b)
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref[a:b], rtol=0, atol=0)


def test_streamed_tables_equal_whole_tensor_quantization(tiny_random, tmp_path, monkeypatch):
    """Pieces of a few thousand values per read must give exactly the blocks that quantizing
    the whole tensor at once gives (RTN is row-local), for exact, re-quantized and float types."""
    from quantize.formats.gguf import writer

    monkeypatch.setattr(writer, "STREAM_ELEMENTS", 5000)  # rows of 6400 / 256 values: 1 / 19 rows a piece
    reads = []
    real_read_rows = Checkpoint.read_rows
    monkeypatch.setattr(Checkpoint, "read_rows", lambda self, n, a, b: reads.append(n) or real_read_rows(self, n, a, b))
    towers = {**KEEP_ALL, "per_layer_embeddings": "int8_row", "token_embeddings": "int4"}
    ctx, opts = make_ctx(tiny_random, tmp_path, "auto", towers=towers, token_embeddings="Q4_0", per_layer_embeddings="Q8_0")
    (path,) = write_gguf(ctx, opts)
    got = {x.name: x for x in GGUFReader(path).tensors}
    ck = Checkpoint(tiny_random)
    for gguf_name, suffix, preset, qtype in (("per_layer_token_embd.weight", "embed_tokens_per_layer.weight", "int8_row", T.Q8_0),
                                             ("token_embd.weight", "embed_tokens.weight", "int4", T.Q4_0)):
        src = next(n for n in ck.tensors if n.endswith(suffix) and "language_model" in n)
        whole = quantize_rtn(src, ck.get(src), resolve_scheme(preset)).dequantize().numpy()
        t = got[gguf_name]
        assert t.tensor_type == qtype
        deq = gq.dequantize(t.data, qtype).reshape(-1, whole.shape[1])
        np.testing.assert_array_equal(deq[: whole.shape[0]], whole)
        pad = deq[whole.shape[0]:]
        if gguf_name == "per_layer_token_embd.weight":  # ids past the table read row 0 in transformers
            assert len(pad) == 4352 - 4096 and (pad == whole[0]).all()
        else:
            assert len(pad) == 0  # token_embd holds every id already
        assert reads.count(src) > 1  # really read in pieces


def test_dry_run_description_predicts_the_written_tensor_bytes(tiny_random, tmp_path):
    from quantize.formats.gguf import describe_text_plan

    towers = {**KEEP_ALL, "text": "int4", "token_embeddings": "int8"}
    rules = [{"match": ["per_layer_token_embd.weight"], "type": "Q5_K"}, {"match": ["blk.*.ffn_down.weight"], "type": "Q6_K"}]
    ctx, opts = make_ctx(tiny_random, tmp_path, "auto", towers=towers, tensor_types=rules)
    line = describe_text_plan(plan_text(ctx, opts))
    (path,) = write_gguf(ctx, opts)
    tensors = GGUFReader(path).tensors
    written = sum(int(t.n_bytes) for t in tensors)
    assert f": {written:,} bytes of tensor data" in line
    types = {t.name: t.tensor_type for t in tensors}
    assert types["per_layer_token_embd.weight"] == T.Q5_K and types["blk.3.ffn_down.weight"] == T.Q6_K
    assert types["blk.3.ffn_up.weight"] == T.Q4_0 and types["token_embd.weight"] == T.Q8_0


def test_tensor_types_rule_matching_nothing_is_refused(tiny_random, tmp_path):
    ctx, opts = make_ctx(tiny_random, tmp_path, "Q4_0", tensor_types=[{"match": ["per_layer_token_emb.weight"], "type": "Q5_K"}])
    with pytest.raises(ExportError, match=r"tensor_types.0.match \['per_layer_token_emb.weight'\] matches no quantizable GGUF tensor"):
        write_gguf(ctx, opts)
    assert list(tmp_path.iterdir()) == []


def test_low_bit_kquants_fall_back_and_name_the_file():
    # 128-column rows do not fit 256-value super-blocks: llama.cpp falls back to a 32-block type
    # (IQ4_NL for Q2_K/Q3_K, which we do not write: Q4_0 has its 4.5 bits per weight).
    from gguf import GGMLQuantizationType as T, LlamaFileType as FT

    from quantize.formats.gguf.mixes import file_type, with_fallback

    assert with_fallback(T.Q2_K, 128) == T.Q4_0 and with_fallback(T.Q3_K, 128) == T.Q4_0
    assert with_fallback(T.Q3_K, 512) == T.Q3_K
    assert file_type("auto", {T.Q3_K: 10, T.Q8_0: 3}) == FT.MOSTLY_Q3_K_M
    assert file_type("auto", {T.Q2_K: 10, T.F32: 30}) == FT.MOSTLY_Q2_K


@pytest.mark.parametrize("front_matter", ["license: [gemma\ntags: {\n", "license: 5\ntags: [a]\n"],
                         ids=["not-yaml", "license-not-text"])
def test_a_model_card_that_is_not_yaml_costs_only_its_keys(tiny_random, tmp_path, caplog, front_matter):
    """general.* come from the model card's front matter (quantize.formats.gguf.general); one
    that YAML cannot read, or whose values the keys cannot hold (llama.cpp's converter stops with
    a TypeError on ``license: 5``), is logged and skipped: the GGUF is written, without card keys."""
    import logging
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_random, folder)
    (folder / "README.md").write_text(f"---\n{front_matter}---\n# card\n")
    ctx, opts = make_ctx(folder, tmp_path / "out", "F32")
    with caplog.at_level(logging.WARNING, logger="quantize.formats.gguf.general"):
        (path,) = write_gguf(ctx, opts)
    r = GGUFReader(path)
    assert _field(r, "general.name") == "t" and _field(r, "general.type") == "model"
    assert "general.license" not in r.fields and "general.tags" not in r.fields and "general.size_label" in r.fields
    assert any(str(folder) in m and "model card not read" in m for m in caplog.messages)


@pytest.mark.parametrize("name,text,message", [
    ("added_tokens.json", '["<x>"]', r"added_tokens.json: expected an object of token -> integer id"),
    ("added_tokens.json", '{"<x>": 99999}', r"added_tokens.json: token '<x>' has id 99999 >= vocab_size 4352"),
    ("tokenizer_config.json", "{not json", r"tokenizer_config.json: not valid JSON"),
])
def test_bad_tokenizer_files_name_the_file(tiny_random, tmp_path, name, text, message):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_random, folder)
    (folder / name).write_text(text)
    ctx, opts = make_ctx(folder, tmp_path / "out", "F32")
    with pytest.raises(ExportError, match=message):
        write_gguf(ctx, opts)
    assert not list(tmp_path.glob("out/*.gguf*"))  # the vocabulary is read before anything is written
