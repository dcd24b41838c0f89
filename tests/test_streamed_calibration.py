"""Streamed calibration (quantize.streamed_model via pipeline._calibrate) against the
whole-model calibration: ``from_pretrained`` of the full model, the towers' statistics and the
sequential engine on it, as the pipeline did before streaming. Same recipe, same calibration
data (text, images, audio and multimodal batches): the same codes, scales, KV scales, AWQ
changes and tower statistics, bit for bit, while the streamed path holds at most one decoder
layer's weights (counted from the model's own parameters at every layer's forward).
"""
from __future__ import annotations

import pytest
import torch

from quantize.pipeline import _calibrate, load_processor
from quantize.recipe import load_recipe

CALIBRATION = {
    "text": {"source": "embedded", "n_samples": 2, "seq_len": 64},
    "images": {"source": "embedded", "n_samples": 1},
    "audio": {"source": "embedded", "n_samples": 1},
    "multimodal_samples": 2,
}
TOWERS = {
    "text": {"preset": "int4_gptq", "act_order": True},
    "token_embeddings": "int8", "per_layer_embeddings": "int8", "per_layer_projections": "keep",
    "altup_laurel": "keep", "embedders": "keep",
    "vision": {"preset": "int8_channel", "importance": True},
    "audio": {"preset": "int8_channel", "importance": True},
}


def _recipe(model, tmp_path, text_tower, kv_fp8: bool):
    from calibrate.config import CalibrationConfig
    from quantize.recipe import Recipe

    r = load_recipe("recipes/demo.yaml", model=str(model), output=str(tmp_path / "out"))
    data = r.model_dump(mode="json", exclude_none=True)
    data["calibration"] = CalibrationConfig.model_validate(CALIBRATION).model_dump(mode="json", exclude_none=True)
    data["towers"] = {**TOWERS, "text": text_tower}
    data["kv_cache"] = {**data.get("kv_cache", {}), "fp8": kv_fp8}
    return Recipe.model_validate(data)


def _bf16_decoder_recipe(folder, tmp_path):
    """A recipe for the decoder's compute dtype alone: GPTQ act-order text, text-only calibration,
    the towers kept (their statistics would run bf16 convolutions, which take many minutes on a
    CPU without bf16 instructions; pipeline._tower_dtype)."""
    from calibrate.config import CalibrationConfig
    from quantize.recipe import Recipe

    data = _recipe(folder, tmp_path, {"preset": "int4_gptq", "act_order": True}, False).model_dump(mode="json", exclude_none=True)
    data["towers"] = {**TOWERS, "vision": "keep", "audio": "keep"}
    data["calibration"] = CalibrationConfig.model_validate({"text": CALIBRATION["text"]}).model_dump(mode="json", exclude_none=True)
    return Recipe.model_validate(data)


def _whole_model_calibration(recipe, ckpt, plan, multimodal: bool = True):
    """The reference: the whole model loaded by transformers, as pipeline._calibrate did."""
    from transformers import Gemma3nForConditionalGeneration

    from calibrate import build_calibration
    from quantize.pipeline import _text_calibrated, _tower_calibrated
    from quantize.sequential import quantize_text_decoder
    from quantize.tower_stats import tower_importance

    torch.manual_seed(recipe.seed)
    calib = build_calibration(recipe.calibration, load_processor(ckpt.folder), seed=recipe.seed)
    model = Gemma3nForConditionalGeneration.from_pretrained(str(ckpt.folder), dtype="auto").eval()
    towers = {e.tower for e in plan.entries if _tower_calibrated(e)}
    importance = tower_importance(model, calib.images if "vision" in towers else None,
                                  calib.audio if "audio" in towers else None) if towers else {}
    schemes = {e.name: e.scheme for e in plan.entries if e.quantized and e.tower == "text"}
    assert any(_text_calibrated(e) for e in plan.entries)
    batches = [{"input_ids": ids} for ids in calib.text] + list(calib.multimodal)
    if multimodal:
        assert any("pixel_values" in b for b in batches) and any("input_features" in b for b in batches)
    result = quantize_text_decoder(model, schemes, batches, device=recipe.device, kv_fp8=recipe.kv_cache.fp8,
                                   progress=False, compute_dtype=getattr(torch, recipe.compute_dtype))
    return calib.manifest, result, importance


def _layer_bytes(ckpt, i):
    prefix = f"model.language_model.layers.{i}."
    return sum(t.nbytes for n, t in ckpt.tensors.items() if n.startswith(prefix))


@pytest.mark.parametrize("text_tower,kv_fp8", [
    ({"preset": "int4_gptq", "act_order": True}, True),
    ({"preset": "int4_awq"}, False),
], ids=["gptq-act-order-kv", "awq"])
def test_streamed_equals_whole_model(tiny_trained, tmp_path, monkeypatch, text_tower, kv_fp8):
    from quantize import sequential
    from quantize.pipeline import prepare

    recipe = _recipe(tiny_trained, tmp_path, text_tower, kv_fp8)
    ckpt, plan = prepare(recipe)
    want_manifest, want, want_importance = _whole_model_calibration(recipe, ckpt, plan)

    # Resident weights, counted from the model's own parameters and buffers whenever a decoder
    # layer runs in the streamed path (the engine's run_layer is the one place layers run).
    seen = {"peak": 0, "towers_resident": False, "calls": 0}
    real_run_layer = sequential.run_layer

    def counting_run_layer(layer, i, *args):
        model = counting_run_layer.model
        resident = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()) if not t.is_meta)
        seen["peak"] = max(seen["peak"], resident)
        seen["calls"] += 1
        seen["towers_resident"] |= any(not p.is_meta for p in model.model.vision_tower.parameters())
        seen["towers_resident"] |= any(not p.is_meta for p in model.model.audio_tower.parameters())
        return real_run_layer(layer, i, *args)

    from quantize import streamed_model
    real_init = streamed_model.StreamedModel.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        counting_run_layer.model = self.model

    monkeypatch.setattr(streamed_model.StreamedModel, "__init__", init)
    monkeypatch.setattr(sequential, "run_layer", counting_run_layer)
    got_manifest, got, got_importance = _calibrate(recipe, ckpt, plan, progress=False, spill=tmp_path / "spill")

    # the calibration record, plus the dtype the decoder's forward ran in (the reference's float32)
    assert got_manifest.pop("decoder_compute_dtype") == {"recipe": "float32", "used": "float32", "why": "set in the recipe"}
    assert got_manifest == want_manifest
    assert sorted(got.tensors) == sorted(want.tensors) and want.tensors
    # the finished layers' codes were read back from disk (quantize.spill), one file per layer
    from quantize.spill import SpilledTensors

    layers_quantized = {n.split(".layers.")[1].split(".")[0] for n in want.tensors}
    assert isinstance(got.tensors, SpilledTensors)
    assert len(list((tmp_path / "spill").glob("*.safetensors"))) == len(layers_quantized)
    for name, qt in want.tensors.items():
        g = got.tensors[name]
        assert torch.equal(g.codes, qt.codes), name
        assert torch.equal(g.scales, qt.scales), name
        assert (g.zero_points is None and qt.zero_points is None) or torch.equal(g.zero_points, qt.zero_points), name
    assert sorted(got.importance) == sorted(want.importance)
    assert all(torch.equal(got.importance[k], want.importance[k]) for k in want.importance)
    assert sorted(got.updated) == sorted(want.updated)
    assert all(torch.equal(got.updated[k], want.updated[k]) for k in want.updated)
    assert sorted(got.rescaled) == sorted(want.rescaled)
    for k, r in want.rescaled.items():
        for a, b in ((got.rescaled[k].cols, r.cols), (got.rescaled[k].rows, r.rows)):
            assert (a is None and b is None) or torch.equal(a, b), k
    assert got.kv_scales == want.kv_scales and got.layer_kv_scales == want.layer_kv_scales
    assert bool(want.kv_scales) == kv_fp8
    assert {i: r["rel_error"] for i, r in got.report.items()} == {i: r["rel_error"] for i, r in want.report.items()}
    assert sorted(got_importance) == sorted(want_importance) and want_importance
    assert all(torch.equal(got_importance[k], want_importance[k]) for k in want_importance)

    # Memory: at every layer's run, no tower and at most one decoder layer are resident, beside
    # the small always-resident part (the token tables' calibration rows, the AltUp and
    # per-layer projections, the embedders, the config-computed buffers).
    n_layers = len(ckpt.text_config["layer_types"])
    assert seen["calls"] > 0 and not seen["towers_resident"]
    biggest_layer = max(_layer_bytes(ckpt, i) for i in range(n_layers))
    whole = sum(t.nbytes for t in ckpt.tensors.values())
    small = sum(t.nbytes for n, t in ckpt.tensors.items()
                if any(n.startswith(p) for p in ("model.language_model.altup_projections", "model.language_model.per_layer_model_projection",
                                                  "model.language_model.per_layer_projection_norm", "model.embed_vision", "model.embed_audio")))
    assert seen["peak"] <= 2 * biggest_layer + small + 2 * 2**20, (seen["peak"], biggest_layer, small, whole)
    assert seen["peak"] < whole / 4


def test_missing_processor_files_is_one_line(tiny_trained, tmp_path):
    """A model folder without tokenizer/processor files (like bench/synthetic_e4b.py's): one
    line naming the missing files, exit 2 from the CLI, nothing written."""
    import shutil
    import subprocess
    import sys

    folder = tmp_path / "model"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_trained / f, folder / f)
    recipe = tmp_path / "r.yaml"
    recipe.write_text((open("recipes/demo.yaml").read()))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "quantize", "run", str(recipe), "--model", str(folder), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr
    assert "tokenizer.json or tokenizer.model" in err[-1] and "processor_config.json" in err[-1] and str(folder) in err[-1]
    assert not out.exists()


def test_text_only_checkpoint_streams_without_towers_or_embedders(tiny_trained, tmp_path):
    """A checkpoint with only the text model (like bench/synthetic_e4b.py's): the embedders the
    forward runs on every batch are absent; their output is discarded for text tokens, so the
    streamed codes still equal the whole model's (which transformers fills at random)."""
    from quantize.pipeline import prepare

    folder = _rewritten_copy(tiny_trained, tmp_path / "text-only",
                             lambda ts: {k: v for k, v in ts.items() if k.startswith("model.language_model.")})
    recipe = _recipe(folder, tmp_path, {"preset": "int4_gptq"}, False)
    from calibrate.config import CalibrationConfig

    recipe = recipe.model_copy(update={"calibration": CalibrationConfig.model_validate({"text": CALIBRATION["text"]})})
    ckpt, plan = prepare(recipe)
    assert not any(n.startswith(("model.embed_vision", "model.vision_tower")) for n in ckpt.tensors)
    _, want, _ = _whole_model_calibration(recipe, ckpt, plan, multimodal=False)
    _, got, _ = _calibrate(recipe, ckpt, plan, progress=False, spill=tmp_path / "spill")
    assert sorted(got.tensors) == sorted(want.tensors) and want.tensors
    for name, qt in want.tensors.items():
        assert torch.equal(got.tensors[name].codes, qt.codes) and torch.equal(got.tensors[name].scales, qt.scales), name


def _rewritten_copy(src, folder, rewrite, config=None):
    """The checkpoint folder ``src`` copied to ``folder`` with its tensors passed through
    ``rewrite`` (name -> tensor dict in and out) and ``config`` merged into config.json."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, folder / f.name)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    save_file(rewrite(load_file(str(src / "model.safetensors"))), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _bf16_copy(src, folder):
    """The checkpoint with every floating tensor stored in bfloat16 and its config saying so,
    as Google ships E4B."""
    return _rewritten_copy(src, folder, lambda ts: {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                                    for k, v in ts.items()}, config={"dtype": "bfloat16"})


def test_bf16_compute_dtype_streams_as_the_whole_bf16_model(tiny_trained, tmp_path):
    """``compute_dtype: bfloat16`` reaches the engine through the streamed pipeline: on a
    bf16-stored checkpoint its codes equal the whole bf16 model's run through the engine in
    bf16, bit for bit, and differ from the float32 calibration's (the key is read)."""
    from quantize.pipeline import prepare

    folder = _bf16_copy(tiny_trained, tmp_path / "bf16")
    base = _bf16_decoder_recipe(folder, tmp_path)
    recipe = base.model_copy(update={"compute_dtype": "bfloat16"})
    ckpt, plan = prepare(recipe)
    _, want, _ = _whole_model_calibration(recipe, ckpt, plan, multimodal=False)
    _, got, _ = _calibrate(recipe, ckpt, plan, progress=False, spill=tmp_path / "spill")
    assert sorted(got.tensors) == sorted(want.tensors) and want.tensors
    for name, qt in want.tensors.items():
        assert torch.equal(got.tensors[name].codes, qt.codes), name
        assert torch.equal(got.tensors[name].scales, qt.scales), name
    _, fp32, _ = _whole_model_calibration(base, ckpt, plan, multimodal=False)
    assert any(not torch.equal(fp32.tensors[n].codes, qt.codes) for n, qt in want.tensors.items())


@pytest.mark.parametrize("case,expect", [
    ("fp32 checkpoint", "needs the text decoder stored in bfloat16"),
    ("rtn text", "calibrates nothing there"),
    ("awq text", "AWQ folds its scales"),
])
def test_bf16_compute_dtype_refuses_what_it_would_not_do(tiny_trained, tmp_path, case, expect):
    """Refused in ``prepare`` (before a weight is read), one line naming the key: a decoder bf16
    cannot hold exactly, a recipe whose decoder is not calibrated, AWQ's folded scales."""
    from quantize.errors import RecipeError
    from quantize.pipeline import prepare

    folder = tiny_trained if case == "fp32 checkpoint" else _bf16_copy(tiny_trained, tmp_path / "bf16")
    text = {"fp32 checkpoint": {"preset": "int4_gptq"}, "rtn text": "int4", "awq text": {"preset": "int4_awq"}}[case]
    recipe = _recipe(folder, tmp_path, text, False)
    data = {**recipe.model_dump(mode="json", exclude_none=True), "compute_dtype": "bfloat16"}
    for tower in ("vision", "audio"):
        data["towers"][tower] = "int8_channel"  # no importance: nothing else calibrated
    from quantize.recipe import Recipe

    with pytest.raises(RecipeError) as err:
        prepare(Recipe.model_validate(data))
    msg = str(err.value)
    assert msg.startswith("compute_dtype: bfloat16") and expect in msg and "\n" not in msg, msg
    if case == "fp32 checkpoint":
        assert "F32" in msg and str(folder) in msg


def test_auto_compute_dtype_is_bf16_where_the_hardware_has_it(tiny_trained, tmp_path, monkeypatch):
    """``compute_dtype: auto`` on a bf16-stored checkpoint calibrates exactly as an explicit
    ``bfloat16`` where the device multiplies bf16 in hardware and as ``float32`` where it does
    not (codes and scales bit for bit; ``quantize.device.native_bf16`` answered both ways), and
    the calibration record says which was used and why. Where an explicit bfloat16 would be
    refused (a float32 checkpoint, AWQ) auto is float32 whatever the hardware."""
    from quantize import device
    from quantize.pipeline import prepare, resolve_compute_dtype

    folder = _bf16_copy(tiny_trained, tmp_path / "bf16")
    base = _bf16_decoder_recipe(folder, tmp_path)
    auto = base.model_copy(update={"compute_dtype": "auto"})
    ckpt, plan = prepare(auto)
    for native, explicit in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(device, "native_bf16", lambda dev, flags=None, native=native: (native, f"hardware says {native}"))
        man, got, _ = _calibrate(auto, ckpt, plan, progress=False, spill=tmp_path / f"spill-auto-{native}")
        assert man["decoder_compute_dtype"] == {"recipe": "auto", "used": explicit, "why": f"auto: hardware says {native}"}
        recipe = base.model_copy(update={"compute_dtype": explicit})
        man, want, _ = _calibrate(recipe, ckpt, plan, progress=False, spill=tmp_path / f"spill-{explicit}")
        assert man["decoder_compute_dtype"] == {"recipe": explicit, "used": explicit, "why": "set in the recipe"}
        assert sorted(got.tensors) == sorted(want.tensors) and want.tensors
        for name, qt in want.tensors.items():
            assert torch.equal(got.tensors[name].codes, qt.codes), (native, name)
            assert torch.equal(got.tensors[name].scales, qt.scales), (native, name)

    monkeypatch.setattr(device, "native_bf16", lambda dev, flags=None: (True, "hardware says True"))
    fp32 = _recipe(tiny_trained, tmp_path, {"preset": "int4_gptq"}, False).model_copy(update={"compute_dtype": "auto"})
    awq = _recipe(folder, tmp_path, {"preset": "int4_awq"}, False).model_copy(update={"compute_dtype": "auto"})
    for recipe, expect in ((fp32, "needs the text decoder stored in bfloat16"), (awq, "AWQ folds its scales")):
        dtype, why = resolve_compute_dtype(recipe, *prepare(recipe))
        assert dtype == "float32" and why.startswith("auto: float32, since bfloat16") and expect in why, why
        assert str(tmp_path) not in why  # the manifest names nothing on this machine


def test_native_bf16_reads_the_cpu_flags():
    """``native_bf16`` on the CPU: an x86 flags line with AVX512-BF16 or AMX-BF16 counts, one
    with AVX-512 alone does not, and a CPU without a flags line (aarch64's ``Features``) counts
    as without (cpuinfo text written by hand)."""
    from quantize.device import cpu_flags, native_bf16

    cpu = torch.device("cpu")
    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
    skylake = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    sapphire = "flags\t: avx512f amx_bf16 amx_tile amx_int8\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n"
    assert native_bf16(cpu, cpu_flags(zen4)) == (True, "the CPU has avx512_bf16")
    assert native_bf16(cpu, cpu_flags(sapphire)) == (True, "the CPU has amx_bf16")
    assert native_bf16(cpu, cpu_flags(skylake)) == (False, "the CPU has none of avx512_bf16, amx_bf16")
    assert cpu_flags(arm) == set() and not native_bf16(cpu, cpu_flags(arm))[0]


def test_native_bf16_needs_onednn(monkeypatch):
    """A torch build without oneDNN multiplies bf16 in a reference loop: no native bf16 then,
    whatever the CPU flags say."""
    from quantize.device import native_bf16

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    ok, why = native_bf16(torch.device("cpu"), {"avx512f", "avx512_bf16"})
    assert not ok and "no oneDNN" in why


def test_towers_of_a_bf16_checkpoint_calibrate_in_float32_without_bf16_hardware(tiny_trained, tmp_path, monkeypatch):
    """The towers' statistics forward of a bf16 checkpoint: float32 where the CPU lacks bf16
    instructions (bf16 convolutions there run in a reference loop: MobileNetV5 over 15 minutes on
    the tiny model's images), as stored where it has them; the manifest says which and why. The
    upcast run's statistics are the float32 forward's of the same bf16 weights (transformers'
    whole model, cast): the vision tower's bit for bit, the audio tower's within 1% in norm (its relative
    position table is a buffer computed when the skeleton is built, in bf16 there)."""
    from transformers import Gemma3nForConditionalGeneration

    from calibrate import build_calibration
    from quantize import device
    from quantize.pipeline import _tower_dtype, load_processor, prepare
    from quantize.tower_stats import tower_importance

    assert _tower_dtype(torch.float32) == (torch.float32, "the checkpoint is stored in float32")
    for native in (True, False):
        monkeypatch.setattr(device, "native_bf16", lambda dev, flags=None, native=native: (native, f"hardware says {native}"))
        assert _tower_dtype(torch.bfloat16)[0] == (torch.bfloat16 if native else torch.float32)

    folder = _bf16_copy(tiny_trained, tmp_path / "bf16")
    recipe = _recipe(folder, tmp_path, "keep", False)  # towers only: vision and audio with importance
    ckpt, plan = prepare(recipe)
    man, _, got = _calibrate(recipe, ckpt, plan, progress=False, spill=tmp_path / "spill")
    assert man["tower_compute_dtype"] == {"used": "float32", "why": "float32: hardware says False, and bf16 "
                                                                    "convolutions would run in a slow reference loop"}
    torch.manual_seed(recipe.seed)
    calib = build_calibration(recipe.calibration, load_processor(folder), seed=recipe.seed)
    model = Gemma3nForConditionalGeneration.from_pretrained(str(folder), dtype=torch.bfloat16).float().eval()
    want = tower_importance(model, calib.images, calib.audio)
    assert sorted(got) == sorted(want) and any(".vision_tower." in n for n in got) and any(".audio_tower." in n for n in got)
    for name, v in want.items():
        if ".vision_tower." in name:
            assert torch.equal(got[name], v), name
        else:
            assert float((got[name] - v).norm() / v.norm()) < 1e-2, name


def test_a_tower_loaded_in_float32_leaves_the_bf16_skeleton_as_it_was(tiny_trained, tmp_path):
    """``load_tower(dtype=float32)`` reads the tower straight into float32 and casts its embedder
    and the tower's computed buffers along; ``release_tower`` leaves every parameter, buffer and
    embedder weight as the bf16 skeleton had them (the embedder bit for bit: it serves the
    decoder's batches afterwards)."""
    from quantize.model import Checkpoint
    from quantize.streamed_model import EMBEDDERS, TOWERS, StreamedModel

    folder = _bf16_copy(tiny_trained, tmp_path / "bf16")
    streamed = StreamedModel(Checkpoint(folder), [torch.tensor([[2, 5, 7]])])
    model = streamed.model

    def state(prefix):
        mod = model.get_submodule(prefix)
        return ({n: (p.dtype, p.is_meta, None if p.is_meta else p.clone()) for n, p in mod.named_parameters()},
                {n: (b.dtype, b.clone()) for n, b in mod.named_buffers()})

    for tower in ("vision", "audio"):
        before = {k: state(v) for k, v in ((tower, TOWERS[tower]), ("embedder", EMBEDDERS[tower]))}
        assert all(meta and dt == torch.bfloat16 for dt, meta, _ in before[tower][0].values())
        streamed.load_tower(tower, dtype=torch.float32)
        ckpt = Checkpoint(folder)
        for prefix in (TOWERS[tower], EMBEDDERS[tower]):
            for n, p in model.get_submodule(prefix).named_parameters():
                assert p.dtype == torch.float32 and not p.is_meta, n
                assert torch.equal(p, ckpt.get(f"{prefix}.{n}").float()), n  # bf16 -> float32 is exact
            assert all(b.dtype == torch.float32 for b in model.get_submodule(prefix).buffers() if b.is_floating_point())
        streamed.release_tower(tower)
        after = {k: state(v) for k, v in ((tower, TOWERS[tower]), ("embedder", EMBEDDERS[tower]))}
        for part in before:
            for (n, (dt, meta, v)), (n2, (dt2, meta2, v2)) in zip(before[part][0].items(), after[part][0].items()):
                assert (n, dt, meta) == (n2, dt2, meta2) and (v is None or torch.equal(v, v2)), n
            for (n, (dt, v)), (n2, (dt2, v2)) in zip(before[part][1].items(), after[part][1].items()):
                assert (n, dt) == (n2, dt2) and torch.equal(v, v2), n
    assert not streamed._skeleton_dtypes
