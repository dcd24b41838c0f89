"""quantize.spill: finished layers' quantized tensors on disk until the writers read them.

The references are the tensors as the algorithms returned them (compared bit for bit after the
round trip through the file) and the pipeline's output folder as a run leaves it. The spilled
path against the whole-model, in-memory calibration is checked in test_streamed_calibration.py.
"""
from __future__ import annotations

import pytest
import torch

from quantize.methods.rtn import quantize_fp8, quantize_int
from quantize.schemes import PRESET_SCHEMES
from quantize.spill import SpilledTensors


def _tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, generator=g)
    out = {}
    for preset in ("int4", "int4_asym", "int8_channel", "fp8", "fp8_tensor"):
        name = f"layers.{seed}.{preset}.weight"
        fn = quantize_fp8 if preset.startswith("fp8") else quantize_int
        out[name] = fn(name, w * (1 + seed), PRESET_SCHEMES[preset])
    out[f"layers.{seed}.int4.weight"].info["fallback"] = "rtn: hand-set note"
    return out


def test_round_trip_is_bit_exact_for_every_code_type(tmp_path):
    store = SpilledTensors(tmp_path)
    want = {}
    for seed in range(3):  # three "layers", one file each
        t = _tensors(seed)
        want.update(t)
        store.add(t)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert sorted(store) == sorted(want) and len(store) == len(want)
    for name, qt in want.items():
        got = store[name]
        assert got.name == name and got.shape == qt.shape and got.scheme == qt.scheme and got.info == qt.info
        for a, b in ((got.codes, qt.codes), (got.scales, qt.scales)):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                                                      b.view(torch.uint8) if b.dtype.itemsize == 1 else b), name
        assert (got.zero_points is None) == (qt.zero_points is None), name
        if qt.zero_points is not None:
            assert torch.equal(got.zero_points, qt.zero_points), name
        assert torch.equal(got.dequantize(), qt.dequantize()), name
    assert "layers.9.int4.weight" not in store
    with pytest.raises(KeyError):
        store["layers.9.int4.weight"]


def test_a_name_spilled_twice_is_refused(tmp_path):
    store = SpilledTensors(tmp_path)
    store.add(_tensors(0))
    with pytest.raises(ValueError, match="layers.0.int4.weight: already spilled"):
        store.add({"layers.0.int4.weight": _tensors(0)["layers.0.int4.weight"]})


def test_run_leaves_no_spill_folder(tiny_trained, tmp_path):
    """A GPTQ run spills into its partial output folder; the finished folder holds the artifacts
    and the manifest only, and the manifest lists no spilled file."""
    import json

    from quantize.pipeline import SPILL_DIR, run
    from quantize.recipe import load_recipe

    recipe = load_recipe("recipes/demo.yaml", model=str(tiny_trained), output=str(tmp_path / "out"))
    data = recipe.model_dump(mode="json", exclude_none=True)
    data["towers"] = {**data["towers"], "text": "int4_gptq", "vision": "keep", "audio": "keep"}
    data["calibration"] = {"text": {"source": "embedded", "n_samples": 1, "seq_len": 32},
                           "images": {"n_samples": 0}, "audio": {"n_samples": 0}, "multimodal_samples": 0}
    data.pop("eval", None)
    res = run(type(recipe).model_validate(data), progress=False)
    out = tmp_path / "out"
    assert res.manifest["quantization"], "the sequential engine ran"
    assert not (out / SPILL_DIR).exists()
    assert not any(p.name.startswith(".spill") for p in out.rglob("*"))
    files = json.dumps(json.loads((out / "manifest.json").read_text()))
    assert SPILL_DIR not in files
