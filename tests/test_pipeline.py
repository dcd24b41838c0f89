"""End to end: the demo recipe on the tiny trained model, checked across independent readers
(gguf-py's dequantizer for the GGUF, transformers' compressed-tensors loader for the
safetensors), the manifest's sums against the files, and byte-identical reruns."""
import hashlib
import json
from pathlib import Path

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


def test_manifest_lists_every_artifact_with_true_sums(demo_run, tiny_trained):
    out = demo_run.out_dir
    manifest = json.loads((out / "manifest.json").read_text())
    # the model's sum as manifest.model_hash defines it: config.json then the shards, name and sha256
    folder = Path(tiny_trained)
    h = hashlib.sha256()
    for p in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    assert manifest["model"]["sha256"] == h.hexdigest()
    files = {f["path"]: f for f in manifest["artifacts"]}
    assert any(p.endswith(".gguf") for p in files) and any(p.endswith(".safetensors") for p in files)
    for rel, f in files.items():
        assert _sha(out / rel) == f["sha256"] and (out / rel).stat().st_size == f["bytes"]
    assert manifest["calibration"]["seed"] == 0
    assert len(manifest["plan"]["dead_kv_not_quantized"]) == 15  # k_proj, v_proj, k_norm of layers 20-24
    assert any("audio" in n for n in manifest["notes"])
    # mmproj: auto on a 256-wide text model: skipped, with mtmd's reason in the manifest
    assert not list(out.glob("mmproj*")) and any("no vision mmproj" in n and "2048" in n for n in manifest["notes"])
    assert not list(out.parent.glob(".out.partial-*"))


def test_gguf_and_safetensors_carry_the_same_int4_codes(demo_run):
    """The text decoder's GPTQ codes reach both formats unchanged: gguf-py's Q4_0 dequantizer
    and compressed-tensors' own pack-quantized decompressor give identical weights."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    out = demo_run.out_dir
    gguf_path = next(p for p in out.glob("*.gguf") if not p.name.startswith("mmproj"))
    tensors = {t.name: t for t in GGUFReader(str(gguf_path)).tensors}
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    decompressor = BaseCompressor.get_value_from_registry("pack-quantized")
    with safe_open(str(out / "safetensors" / "model.safetensors"), "pt") as f:
        for gguf_name, module in [
            ("blk.3.ffn_down.weight", "model.language_model.layers.3.mlp.down_proj"),
            ("blk.18.attn_k.weight", "model.language_model.layers.18.self_attn.k_proj"),
        ]:
            t = tensors[gguf_name]
            assert t.tensor_type.name == "Q4_0"
            w_gguf = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(tuple(reversed(t.shape.tolist())))
            local = {k: f.get_tensor(f"{module}.{k}") for k in ("weight_packed", "weight_scale", "weight_shape")}
            local["weight_scale"] = local["weight_scale"].float()
            w_ct = decompressor.decompress(local, scheme)["weight"]
            assert torch.equal(w_gguf.float(), w_ct.float()), gguf_name


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


def test_rerun_is_byte_identical(demo_run, tiny_trained):
    """The same recipe (same output folder included: it is part of the recorded recipe), model
    and seed: every file of the rerun, manifest included, has the same bytes."""
    from calibrate.config import CalibrationConfig

    out = demo_run.out_dir
    before = {p.relative_to(out): _sha(p) for p in sorted(out.rglob("*")) if p.is_file()}
    recipe = _demo(tiny_trained, out, calibration=CalibrationConfig.model_validate(SMALL_CALIBRATION))
    run(recipe, progress=False)
    after = {p.relative_to(out): _sha(p) for p in sorted(out.rglob("*")) if p.is_file()}
    assert before == after


def _fake_checkpoint(tmp_path, shard_mib: int):
    """What ``model_hash`` reads of a checkpoint: its folder (config.json) and shard files."""
    from types import SimpleNamespace

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gemma3n"}')
    shard = folder / "model.safetensors"
    shard.write_bytes(torch.randint(0, 256, (shard_mib << 20,), generator=torch.Generator().manual_seed(1),
                                    dtype=torch.uint8).numpy().tobytes())
    return SimpleNamespace(folder=folder, files=[shard])


def test_low_priority_task_hashes_the_model_at_nice_19(tmp_path):
    """A calibrated run hashes the checkpoint on a ``LowPriorityTask`` while it calibrates: the
    sum is the one hashlib gives for manifest.model_hash's definition, the task's thread runs at
    nice 19 as the kernel reports it, and the caller's priority is untouched."""
    import os
    import threading

    from quantize.background import LowPriorityTask
    from quantize.manifest import model_hash

    ckpt = _fake_checkpoint(tmp_path, 8)
    h = hashlib.sha256()
    for p in [ckpt.folder / "config.json", *ckpt.files]:
        h.update(p.name.encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    before = os.getpriority(os.PRIO_PROCESS, 0)
    task = LowPriorityTask("model-hash", lambda stop: model_hash(ckpt, desc=None, workers=1, stop=stop))
    assert task.result() == h.hexdigest()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
    seen = LowPriorityTask("probe", lambda stop: (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                                                 threading.current_thread() is threading.main_thread())).result()
    assert seen == (19, False)


def test_low_priority_task_stops_when_the_run_fails(tmp_path):
    """``cancel()`` (the run's calibration raised): the work stops at its next check of ``stop``
    instead of reading the rest of the checkpoint, and no thread is left running."""
    import threading

    from quantize.background import Cancelled, LowPriorityTask
    from quantize.manifest import model_hash, sha256_file

    ckpt = _fake_checkpoint(tmp_path, 16)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        sha256_file(ckpt.files[0], stop=stop)
    task = LowPriorityTask("model-hash", lambda stop: model_hash(ckpt, desc=None, workers=1, stop=stop))
    task.cancel()
    assert task._future.done()  # cancel waits for the thread: stopped (or, rarely, already finished)
    assert not [t for t in threading.enumerate() if t.name.startswith("model-hash")]


def test_a_calibrated_run_hashes_the_model_beside_the_calibration(tiny_trained, tmp_path, monkeypatch):
    """The run's model_hash call happens off the main thread, at nice 19 as the kernel reports
    it, during a calibrated run (and the manifest's sum is still the hashlib one); an RTN run
    hashes on the main thread."""
    import os
    import threading

    import quantize.pipeline as pipeline
    from calibrate.config import CalibrationConfig

    calls = []
    real = pipeline.model_hash

    def spy(ckpt, **kw):
        calls.append((threading.current_thread() is threading.main_thread(),
                      os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return real(ckpt, **kw)

    monkeypatch.setattr(pipeline, "model_hash", spy)
    calib = CalibrationConfig.model_validate({"text": {"source": "embedded", "n_samples": 1, "seq_len": 32},
                                              "images": {"n_samples": 0}, "audio": {"n_samples": 0}})
    main_nice = os.getpriority(os.PRIO_PROCESS, 0)
    for label, text in (("calibrated", "int4_gptq"), ("rtn", "int4")):
        r = load_recipe("recipes/demo.yaml", model=str(tiny_trained), output=str(tmp_path / label))
        r = r.model_validate({**r.model_dump(), "calibration": calib.model_dump(),
                              "towers": {**r.towers.model_dump(), "text": text, "vision": "keep", "audio": "keep"},
                              "exports": {"gguf": {"mix": "auto", "mmproj": False}}})
        res = run(r, progress=False)
        folder = Path(tiny_trained)
        h = hashlib.sha256()
        for p in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
            h.update(p.name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
        assert res.manifest["model"]["sha256"] == h.hexdigest()
    assert calls == [(False, 19), (True, main_nice)]

