"""End to end: the demo recipe on the tiny trained model, checked across independent readers
(gguf-py's dequantizer for the GGUF, transformers' compressed-tensors loader for the
safetensors), the manifest's sums against the files, and byte-identical reruns."""
import hashlib
import json

import pytest
import torch

from quantize.pipeline import run
from quantize.recipe import load_recipe

SMALL_CALIBRATION = {
    "text": {"source": "embedded", "n_samples": 2, "seq_len": 64},
    "images": {"source": "embedded", "n_samples": 1},
    "audio": {"source": "embedded", "n_samples": 1},
    "multimodal_samples": 1,
}


def _demo(model, out, **changes):
    r = load_recipe("recipes/demo.yaml", model=str(model), output=str(out))
    return r.model_copy(update=changes)


@pytest.fixture(scope="module")
def demo_run(tiny_trained, tmp_path_factory):
    from calibrate.config import CalibrationConfig

    out = tmp_path_factory.mktemp("demo") / "out"
    recipe = _demo(tiny_trained, out, calibration=CalibrationConfig.model_validate(SMALL_CALIBRATION))
    return run(recipe, progress=False)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_manifest_lists_every_artifact_with_true_sums(demo_run):
    out = demo_run.out_dir
    manifest = json.loads((out / "manifest.json").read_text())
    files = {f["path"]: f for f in manifest["artifacts"]}
    assert any(p.endswith(".gguf") for p in files) and any(p.endswith(".safetensors") for p in files)
    for rel, f in files.items():
        assert _sha(out / rel) == f["sha256"] and (out / rel).stat().st_size == f["bytes"]
    assert manifest["calibration"]["seed"] == 0
    assert len(manifest["plan"]["dead_kv_not_quantized"]) == 15  # k_proj, v_proj, k_norm of layers 20-24
    assert any("audio" in n for n in manifest["notes"])
    assert not list(out.parent.glob(".out.partial-*"))


def test_gguf_and_safetensors_carry_the_same_int4_codes(demo_run, tiny_trained):
    """The text decoder's GPTQ codes reach both formats unchanged: gguf-py's Q4_0 dequantizer
    and transformers' compressed-tensors loader see identical weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import Gemma3nForConditionalGeneration

    out = demo_run.out_dir
    gguf_path = next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj"))
    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    model = Gemma3nForConditionalGeneration.from_pretrained(str(out / "safetensors"))
    layers = model.model.language_model.layers
    for i, gguf_name, module in [(3, "blk.3.ffn_down.weight", "mlp.down_proj"), (18, "blk.18.attn_k.weight", "self_attn.k_proj")]:
        t = tensors[gguf_name]
        assert t.tensor_type.name == "Q4_0"
        w_gguf = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))).copy())
        mod = layers[i].get_submodule(module)
        w_st = mod.weight if hasattr(mod, "weight") and mod.weight.dtype.is_floating_point else None
        if w_st is None:  # compressed module: decompress through compressed-tensors itself
            from compressed_tensors.linear.compressed_linear import CompressedLinear  # noqa: F401
            w_st = mod.forward.__self__.compressor.decompress_module(mod)  # pragma: no cover
        assert torch.equal(w_gguf.float(), w_st.detach().float()), gguf_name


def test_quantized_safetensors_close_to_reference(demo_run, tiny_trained):
    from transformers import AutoTokenizer, Gemma3nForConditionalGeneration

    from calibrate import heldout_text

    tok = AutoTokenizer.from_pretrained(tiny_trained)
    ids = heldout_text(tok, 2, 128)
    ref = Gemma3nForConditionalGeneration.from_pretrained(str(tiny_trained)).eval()
    q = Gemma3nForConditionalGeneration.from_pretrained(str(demo_run.out_dir / "safetensors")).eval()
    kls = []
    with torch.no_grad():
        for x in ids:
            lp = torch.log_softmax(ref(input_ids=x).logits.float(), -1)
            lq = torch.log_softmax(q(input_ids=x).logits.float(), -1)
            kls.append((lp.exp() * (lp - lq)).sum(-1).mean().item())
    assert 0 < sum(kls) / len(kls) < 0.1, kls


def test_rerun_is_byte_identical(demo_run, tiny_trained, tmp_path):
    from calibrate.config import CalibrationConfig

    recipe = _demo(tiny_trained, tmp_path / "again", calibration=CalibrationConfig.model_validate(SMALL_CALIBRATION))
    again = run(recipe, progress=False)
    a = json.loads((demo_run.out_dir / "manifest.json").read_text())["artifacts"]
    b = json.loads((again.out_dir / "manifest.json").read_text())["artifacts"]
    assert [(f["path"], f["sha256"]) for f in a] == [(f["path"], f["sha256"]) for f in b]
    assert _sha(demo_run.out_dir / "manifest.json") == _sha(again.out_dir / "manifest.json")
