"""GGUF exports run in llama.cpp (through llama-cpp-python) and compared with transformers.

References: transformers' own forward pass (logits, vision tower + embedder) and llama.cpp's
runtime. Logits are compared over held-out text from the embedded corpus (eval split), which
the tiny trained model never saw.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.llamacpp

N_TOKENS = 300


def _llama(path, n_ctx=512):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False)


def llama_logits(path, tokens) -> np.ndarray:
    m = _llama(path)
    try:
        m.eval(tokens)
        return np.array(m.scores[: len(tokens)], dtype=np.float64)
    finally:
        m.close()


def hf_logits(folder, tokens) -> np.ndarray:
    from transformers import Gemma3nForConditionalGeneration

    model = Gemma3nForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].double().numpy()


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(ref: np.ndarray, other: np.ndarray) -> float:
    p, q = _log_softmax(ref), _log_softmax(other)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def top1(ref, other) -> float:
    return float((ref.argmax(-1) == other.argmax(-1)).mean())


@pytest.fixture(scope="module")
def heldout_tokens(tiny_trained, tmp_path_factory):
    """About 300 tokens of eval-split text, tokenized by llama.cpp from our F32 export."""
    from calibrate.embedded_text import split_documents

    text = "\n".join(d.text for d in split_documents("eval")[:3])
    path = _export(tiny_trained, tmp_path_factory.mktemp("f32"), "F32")
    m = _llama(path)
    try:
        toks = m.tokenize(text.encode(), add_bos=True)[:N_TOKENS]
    finally:
        m.close()
    # independent check that llama.cpp tokenizes as the HF tokenizer does
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_trained)(text)["input_ids"][:N_TOKENS]
    assert toks == hf
    return path, toks


@pytest.fixture(scope="module")
def f32_logits(heldout_tokens):
    path, toks = heldout_tokens
    return llama_logits(path, toks)


KEEP_ALL = {"text": "keep", "token_embeddings": "keep", "per_layer_embeddings": "keep", "vision": "keep", "audio": "keep"}


def make_ctx(folder, out, mix, towers=None, mmproj=False, ignore=(), **gguf_opts):
    from pathlib import Path

    from quantize.formats.base import ExportContext
    from quantize.model import Checkpoint
    from quantize.plan import build_plan
    from quantize.recipe import parse_recipe
    from quantize.source import TensorSource

    r = parse_recipe({
        "name": "t", "model": str(folder), "output": str(out), "towers": towers or KEEP_ALL, "ignore": list(ignore),
        "exports": {"gguf": {"mix": mix, "mmproj": mmproj, **gguf_opts}},
    })
    ck = Checkpoint(folder)
    ctx = ExportContext(r, TensorSource(ck, build_plan(r, ck)), Path(out), {"recipe": "t", "model": str(folder)})
    return ctx, r.exports.gguf


def _export(folder, out, mix, **kw):
    from quantize.formats.gguf import write_gguf

    ctx, opts = make_ctx(folder, out, mix, **kw)
    (path,) = write_gguf(ctx, opts)
    return path


def test_f32_export_matches_transformers(tiny_trained, heldout_tokens, f32_logits):
    _, toks = heldout_tokens
    ref = hf_logits(tiny_trained, toks)
    kl = mean_kl(ref, f32_logits)
    agree = top1(ref, f32_logits)
    print(f"F32 vs transformers over {len(toks)} tokens: mean KL {kl:.2e}, top-1 {agree:.3f}")
    assert kl < 1e-3
    assert agree > 0.95


# Mean KL against the F32 export over the held-out tokens, measured on two builds of the tiny
# trained model: Q8_0 1.7e-5 / 2.4e-5, Q4_0 9.3e-5 / 1.5e-4, Q4_K_M 1.0e-4 / 1.5e-4 (the tied
# embeddings are Q6_K in Q4_0 and Q4_K_M, which dominates at this size); the F32 export itself is
# at 1e-9. Bounds leave about 3x headroom. Q4_K_M holds both Q4_K and Q6_K blocks from our encoder.
@pytest.mark.parametrize("mix,bound", [("Q8_0", 1e-4), ("Q4_0", 5e-4), ("Q4_K_M", 5e-4)])
def test_quantized_exports_load_and_stay_close_to_f32(tiny_trained, heldout_tokens, f32_logits, tmp_path, mix, bound):
    _, toks = heldout_tokens
    path = _export(tiny_trained, tmp_path, mix)
    q = llama_logits(path, toks)
    kl = mean_kl(f32_logits, q)
    print(f"{mix} vs F32 export: mean KL {kl:.2e}, top-1 {top1(f32_logits, q):.3f}")
    assert kl < bound


def test_our_bit_allocation_beats_llamacpp_q4_0_at_smaller_size(tiny_trained, heldout_tokens, f32_logits, tmp_path):
    """recipes/int4.yaml's GGUF allocation (RTN here, no calibration) against llama.cpp's own
    quantizer (``llama_model_quantize`` Q4_0 of our F16 export): no larger, at most 0.6x the KL.
    Measured: about 0.91x the size, KL ratio about 0.2 (llama.cpp's Q4_0 spends Q6_K on the tied
    token embedding, which is the output layer and dominates KL, and on the per-layer table)."""
    import ctypes

    f16 = _export(tiny_trained, tmp_path / "f16", "F16")
    theirs = tmp_path / "llamacpp-Q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 1
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True  # our F16 file holds IQ1_S placeholders for the shared layers' k/v
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    towers = {**KEEP_ALL, "text": "int4", "per_layer_projections": "int4",
              "token_embeddings": {"preset": "int8", "importance": True}}
    ours = _export(tiny_trained, tmp_path / "ours", "auto", towers=towers, ignore=["*per_layer_model_projection*"],
                   tensor_types=[{"match": ["per_layer_token_embd.weight"], "type": "Q5_K"}])
    _, toks = heldout_tokens
    kl_ours = mean_kl(f32_logits, llama_logits(ours, toks))
    kl_theirs = mean_kl(f32_logits, llama_logits(theirs, toks))
    size = ours.stat().st_size / theirs.stat().st_size
    print(f"ours {size:.3f}x the size of llama.cpp Q4_0, KL {kl_ours:.2e} vs {kl_theirs:.2e} ({kl_ours / kl_theirs:.3f}x)")
    assert size <= 1.0
    assert kl_ours <= 0.6 * kl_theirs


def test_checkpoint_without_dead_kv_loads(tmp_path):
    """transformers >= 5 drops the KV-shared layers' k/v; llama.cpp still requires them."""
    from quantize.model import Checkpoint
    from quantize.tiny import cached_tiny

    folder = cached_tiny("random", dead_kv=False)
    assert not any(".layers.20.self_attn.k_proj" in n for n in Checkpoint(folder).tensors)
    path = _export(folder, tmp_path, "F32", towers=KEEP_ALL)
    toks = [2, 300, 301, 302, 303, 304, 305, 306]
    got = llama_logits(path, toks)
    ref = hf_logits(folder, toks)
    assert np.isfinite(got).all()
    assert mean_kl(ref, got) < 2e-3


def _mtmd_image_embeddings(text_path, mmproj_path, rgb: np.ndarray) -> np.ndarray:
    """Encode one image with llama.cpp's multimodal library; (n_tokens, n_embd) float32."""
    import ctypes

    from llama_cpp import mtmd_cpp as M

    llm = llama_cpp.Llama(model_path=str(text_path), n_ctx=1024, n_threads=2, verbose=False)
    params = M.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = 2
    params.print_timings = False
    ctx = M.mtmd_init_from_file(str(mmproj_path).encode(), llm.model, params)  # runs mtmd's warm-up
    assert ctx, "mtmd could not load the mmproj"
    try:
        h, w, _ = rgb.shape
        buf = (ctypes.c_uint8 * rgb.size).from_buffer_copy(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())
        bitmap = M.mtmd_bitmap_init(w, h, buf)
        marker = M.mtmd_default_marker()
        text = M.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        chunks = M.mtmd_input_chunks_init()
        bitmaps = (M.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert M.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        images = [M.mtmd_input_chunks_get(chunks, i) for i in range(M.mtmd_input_chunks_size(chunks))]
        images = [c for c in images if M.mtmd_input_chunk_get_type(c) == 1]  # MTMD_INPUT_CHUNK_TYPE_IMAGE
        assert len(images) == 1
        n_tokens = M.mtmd_input_chunk_get_n_tokens(images[0])
        assert M.mtmd_encode_chunk(ctx, images[0]) == 0
        n_embd = llm.n_embd()
        out = np.ctypeslib.as_array(M.mtmd_get_output_embd(ctx), shape=(n_tokens * n_embd,)).copy()
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bitmap)
        return out.reshape(n_tokens, n_embd)
    finally:
        M.mtmd_free(ctx)
        llm.close()


@pytest.mark.slow
def test_vision_mmproj_encodes_an_image_like_transformers(tmp_path):
    """Full-size MobileNetV5 with a 2048-wide tiny text model (mtmd needs text width == vision width)."""
    from gguf import GGUFReader
    from transformers import Gemma3nForConditionalGeneration

    from quantize.formats.gguf import write_gguf
    from quantize.tiny import cached_tiny

    folder = cached_tiny("random", hidden_size=2048, vision_channel_multiplier=1.0)
    ctx, opts = make_ctx(folder, tmp_path, "Q8_0", mmproj=True)
    text_path, mmproj_path = write_gguf(ctx, opts)
    assert mmproj_path.name == "mmproj-t-f16.gguf"
    r = GGUFReader(mmproj_path)
    assert bytes(r.fields["clip.projector_type"].parts[-1]).decode() == "gemma3nv"
    gammas = [t for t in r.tensors if t.name.endswith("layer_scale.gamma")]
    assert gammas and all(len(t.shape) == 4 for t in gammas)
    assert not any(t.name.startswith("a.") or "conformer" in t.name for t in r.tensors)  # no audio
    del r

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:768, 0:768]
    rgb = np.stack([xx * 255 // 767, yy * 255 // 767, (xx + yy) * 255 // 1534], axis=-1).astype(np.int64)
    rgb = np.clip(rgb + rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
    got = _mtmd_image_embeddings(text_path, mmproj_path, rgb)

    model = Gemma3nForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0  # rescale only, as the processor
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=pixels).pooler_output[0].double().numpy()
    assert got.shape == ref.shape == (256, 2048)
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"mmproj vs transformers: min cosine {cos.min():.5f}, relative error {rel:.4f}")
    # measured: min cosine 1.00000, relative error 0.0022 (F16 kernels against fp32 transformers)
    assert cos.min() > 0.999
    assert rel < 0.01


def _as_google_publishes(src, dst):
    """A copy of tiny model ``src`` whose tokenizer files are laid out as Google's Gemma 3n folders
    are (transformers 4.x): ``tokenizer_config.json`` lists every added token under
    ``added_tokens_decoder``, the one place llama.cpp's converter reads them from. A few entries
    exercise the converter's rules: ``<mask>`` and an ``<unused...>`` token not marked special
    (it makes them CONTROL anyway), a non-special token with ``▁`` (USER_DEFINED, as spaces),
    and an ``added_tokens.json`` entry that nothing else names (USER_DEFINED)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    added = {t["id"]: dict(t) for t in json.loads((dst / "tokenizer.json").read_text())["added_tokens"]}
    added[4]["special"] = False  # <mask>
    added[4098].update(content="<unused_vision_0>", special=False)
    added[4099].update(content="\u2581\u2581x", special=False)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    cfg["added_tokens_decoder"] = {str(i): {k: t[k] for k in keys if k in t} for i, t in sorted(added.items())}
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "added_tokens.json").write_text(json.dumps({"<extra_token>": 100}))
    return _as_google_publishes_card(dst)


def _as_google_publishes_card(dst):
    """Google's model card front matter and sampling defaults (abridged), into folder ``dst``."""
    import json

    (dst / "README.md").write_text(
        "---\nlicense: gemma\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n"
        "base_model: google/gemma-3n-E4B\ntags:\n- automatic-speech-recognition\n- video-text-to-text\n---\n"
        "# Gemma 3n model card\n")
    gen = json.loads((dst / "generation_config.json").read_text())
    gen.update(do_sample=True, top_k=64, top_p=0.95, cache_implementation="hybrid")
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return dst


def _fields(path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}, {t.name: t for t in r.tensors}


@pytest.fixture(scope="module")
def converted(tiny_random, tmp_path_factory):
    """(a Google-layout copy of the tiny model named after E4B's repository, llama.cpp's
    converter's F32 GGUF of it)."""
    from llamacpp_converter import ConverterUnavailable, convert  # tests/ is on sys.path (rootdir-less)

    tmp = tmp_path_factory.mktemp("converted")
    folder = _as_google_publishes(tiny_random, tmp / "gemma-3n-E4B-it")
    try:
        return folder, convert(folder, tmp / "theirs-F32.gguf")
    except ConverterUnavailable as e:
        pytest.skip(str(e))


def test_f32_export_is_llamacpps_converter_output(converted, tmp_path):
    """Against llama.cpp's own convert_hf_to_gguf.py (the installed llama-cpp-python's): the same
    metadata key for key (ours adds only its ``quantize.*`` provenance and names the model after
    the recipe), the same vocabulary token for token, and every tensor bit for bit, except the
    KV-shared layers' dead k/v, which we write as zero IQ1_S placeholders (test_gguf.py).
    The converter runs on a clone named after the repository, ours on the same files in the hub
    cache's layout (a folder named by commit), as a hub id is read."""
    import shutil

    from gguf import GGMLQuantizationType as T

    folder, theirs = converted
    snapshot = tmp_path / "hub" / "models--google--gemma-3n-E4B-it" / "snapshots" / "0123456789abcdef"
    shutil.copytree(folder, snapshot)
    ours = _export(snapshot, tmp_path / "ours", "F32")
    (fo, to), (ft, tt) = _fields(ours), _fields(theirs)

    assert fo["general.name"] == "t"  # the recipe's name; the converter titles the folder's
    mine = {k: v for k, v in fo.items() if not k.startswith("quantize.") and k != "general.name"}
    ref = {k: v for k, v in ft.items() if k != "general.name"}
    assert sorted(mine) == sorted(ref)
    for k in ref:
        assert mine[k] == ref[k], k
    # the rules the folder exercises, as the converter applied them
    tokens, types = ref["tokenizer.ggml.tokens"], ref["tokenizer.ggml.token_type"]
    assert (tokens[4], types[4]) == ("<mask>", 3) and (tokens[4098], types[4098]) == ("<unused_vision_0>", 3)
    assert (tokens[4099], types[4099]) == ("  x", 4) and (tokens[100], types[100]) == ("<extra_token>", 4)
    # the model card's and generation config's keys, and the folder name's heuristics
    assert ref["general.license"] == "gemma" and ref["general.sampling.top_k"] == 64
    assert ref["general.basename"] == "gemma" and ref["general.finetune"] == "3n-E4B-it"  # from the repository's name
    assert ref["general.type"] == "model"

    assert sorted(to) == sorted(tt)
    for name, t in tt.items():
        if name in _dead_kv():
            assert to[name].tensor_type in (T.IQ1_S, T.F32) and tuple(to[name].shape) == tuple(t.shape)
            continue
        assert to[name].tensor_type == t.tensor_type and tuple(to[name].shape) == tuple(t.shape), name
        a, b = np.asarray(to[name].data), np.asarray(t.data)
        if name == "per_layer_token_embd.weight":  # the converter pads zeros; we pad row 0 (see below)
            a, b = a[:4096], b[:4096]
            np.testing.assert_array_equal(np.asarray(to[name].data)[4096:], np.broadcast_to(a[0], (4352 - 4096, a.shape[1])))
        np.testing.assert_array_equal(a, b, err_msg=name)


def _dead_kv(n_layer=25, n_shared=5) -> set[str]:
    return {f"blk.{i}.{n}.weight" for i in range(n_layer - n_shared, n_layer) for n in ("attn_k", "attn_v", "attn_k_norm")}


@pytest.mark.parametrize("mix", ["Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"])
def test_named_mix_is_llamacpps_file(converted, tmp_path, mix):
    """``mix: Q4_K_M`` (and the other named mixes) from float weights, no calibration, against
    llama.cpp's own route: its converter's F32 file through ``llama_model_quantize`` (its tensor
    type rules, ggml's encoders). Every tensor the same type and bytes, except: what llama.cpp
    never quantizes (AltUp, LAuReL, per-layer projections...) stays in the input file's type,
    F32 here, which we write as F16 (the converter's default outtype) and which must be exactly
    its rounding; the dead k/v placeholders."""
    import ctypes

    from gguf import GGUFReader

    folder, f32 = converted
    theirs = tmp_path / f"theirs-{mix}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ours = _export(folder, tmp_path / "ours", mix, towers=KEEP_ALL)

    mine = {t.name: t for t in GGUFReader(ours).tensors}
    ref = {t.name: t for t in GGUFReader(theirs).tensors}
    assert sorted(mine) == sorted(ref)
    rounded = same = 0
    for name, t in ref.items():
        if name in _dead_kv():
            continue
        a, b = np.asarray(mine[name].data), np.asarray(t.data)
        if name == "per_layer_token_embd.weight":  # padded with row 0 by us, with zeros by the converter
            assert np.array_equal(a[4096:], np.broadcast_to(a[0], a[4096:].shape))
            a, b = a[:4096], b[:4096]
        if mine[name].tensor_type == t.tensor_type:
            assert np.array_equal(a, b), name
            same += 1
        else:
            assert (mine[name].tensor_type.name, t.tensor_type.name) == ("F16", "F32"), name
            np.testing.assert_array_equal(a, b.astype(np.float16), err_msg=name)
            rounded += 1
    quantized = sum(1 for n, t in ref.items() if n not in _dead_kv() and t.tensor_type.name not in ("F32", "F16"))
    assert quantized >= 100 and same >= quantized and rounded >= 50, (quantized, same, rounded)


def test_multimodal_tokens_get_the_per_layer_input_transformers_gives_them(tiny_trained, tmp_path):
    """mtmd types ``<end_of_image>`` after every image; like the other multimodal slots it lies past
    the per-layer table (``vocab_size_per_layer_input``), where transformers reads row 0 (the pad
    token's) and llama.cpp reads the GGUF's own padded row. Their main embeddings differ too
    (transformers embeds them through ``embed_vision`` / ``embed_audio``, llama.cpp through the tied
    token table, which we leave as the checkpoint has it: it is also the output layer), so this
    model's table rows for them are set to those embeddings (divided by the sqrt(hidden) scale both
    apply); then the per-layer rows are the only difference, and the F32 export must match
    transformers at every position."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import Gemma3nForConditionalGeneration

    folder = tmp_path / "model"
    shutil.copytree(tiny_trained, folder)
    eoi, eoa = 4096, 4096 + 128  # <end_of_image>, <end_of_audio>
    model = Gemma3nForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hard = {eoi: model.model.embed_vision(input_ids=torch.tensor([eoi]))[0],
                eoa: model.model.embed_audio(input_ids=torch.tensor([eoa]))[0]}
    scale = model.model.language_model.embed_tokens.embed_scale.item()
    assert scale == 16.0  # sqrt(256): dividing by it is exact
    del model
    weights = load_file(str(folder / "model.safetensors"))
    table = weights["model.language_model.embed_tokens.weight"]
    for i, v in hard.items():
        table[i] = v / scale
    # nn.Embedding(padding_idx=0) starts the pad row at zero and the tiny model's per-layer table is
    # never trained, so its row 0 is zero, as the converter's padding; a trained checkpoint's need not be
    per_layer = weights["model.language_model.embed_tokens_per_layer.weight"]
    assert not per_layer[0].any()
    per_layer[0] = per_layer[7]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})

    toks = [2, 300, 301, 302, eoi, 303, 304, 305, 306, eoa, 307, 308, 309, 310]
    ref = hf_logits(folder, toks)
    got = llama_logits(_export(folder, tmp_path / "out", "F32"), toks)
    p, q = _log_softmax(ref), _log_softmax(got)
    kl = (np.exp(p) * (p - q)).sum(-1)
    print("per-position KL:", " ".join(f"{x:.1e}" for x in kl))
    assert kl.max() < 1e-5


@pytest.mark.slow
def test_mmproj_metadata_is_llamacpps_converter_output(tmp_path):
    """Our vision mmproj against the converter's ``--mmproj`` on the same full-size MobileNetV5
    (2048-wide tiny text model, Google's model card and sampling defaults; the audio tower removed
    from the copy, where this converter stops at ``subsample_conv_projection.conv_0.norm``). Every
    key the same but the name, the size label and audio (ours is vision only: mtmd has no Gemma 3n
    audio graph; the converter names the projector per modality, ``clip.vision.projector_type``,
    ours in the key mtmd reads first, ``clip.projector_type``); every vision tensor the same values,
    the layer-scale gammas 4-D (mtmd's broadcast needs them so: its warm-up fails on the
    converter's 1-D ones)."""
    import shutil

    from gguf import GGUFReader
    from safetensors.torch import load_file, save_file

    from llamacpp_converter import ConverterUnavailable, convert
    from quantize.tiny import cached_tiny

    folder = tmp_path / "gemma-3n-E4B-it"
    shutil.copytree(cached_tiny("random", hidden_size=2048, vision_channel_multiplier=1.0), folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "audio_tower" not in k}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    del weights
    _as_google_publishes_card(folder)
    try:
        theirs = convert(folder, tmp_path / "theirs-mmproj.gguf", outtype="f16", extra=["--mmproj"])
    except ConverterUnavailable as e:
        pytest.skip(str(e))
    ctx, opts = make_ctx(folder, tmp_path / "ours", "Q8_0", mmproj=True)
    from quantize.formats.gguf import write_gguf

    _, ours = write_gguf(ctx, opts)
    (fo, to), (ft, tt) = _fields(ours), _fields(theirs)

    def comparable(f):
        skip = {"general.name", "general.size_label", "clip.has_audio_encoder", "clip.projector_type",
                "clip.vision.projector_type"}
        return {k: v for k, v in f.items() if k not in skip and not k.startswith(("quantize.", "clip.audio."))}

    assert comparable(fo) == comparable(ft)
    assert fo["clip.projector_type"] == ft["clip.vision.projector_type"] == "gemma3nv"
    assert fo["general.type"] == "mmproj" and fo["general.license"] == "gemma" and fo["general.sampling.top_k"] == 64
    assert fo["clip.has_audio_encoder"] is False

    extra = {n for n in tt if n.startswith("mm.a.") or n in ("mm.embedding.weight", "mm.hard_emb_norm.weight")}
    assert sorted(to) == sorted(set(tt) - extra)  # embedders' hard-token paths: unused by mtmd
    for name, t in tt.items():
        if name in extra:
            continue
        a, b = np.asarray(to[name].data), np.asarray(t.data)
        assert to[name].tensor_type == t.tensor_type, name
        if name.endswith("layer_scale.gamma"):
            assert a.shape == (1, len(b), 1, 1), name  # numpy order; ggml's ne (1, 1, C, 1)
            a = a.reshape(-1)
        np.testing.assert_array_equal(a, b, err_msg=name)
