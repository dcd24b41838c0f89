"""Text GGUF tensors encoded while the calibration runs (quantize/formats/gguf/preencode.py).

References: the file the writer produces on its own (byte for byte, whatever part of a tensor was
encoded ahead) and ggml's own quantizer called directly on the checkpoint's rows."""
import dataclasses
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T, GGUFReader

from quantize.formats.base import ExportContext
from quantize.formats.gguf import write_gguf
from quantize.formats.gguf.ggml_quants import quantize_rows
from quantize.formats.gguf.preencode import PreEncoder
from quantize.model import Checkpoint
from quantize.plan import build_plan
from quantize.recipe import parse_recipe
from quantize.source import TensorSource

TABLE = "model.language_model.embed_tokens_per_layer.weight"
GGUF_TABLE = "per_layer_token_embd.weight"
KEEP_ALL = {t: "keep" for t in ("text", "token_embeddings", "per_layer_embeddings", "per_layer_projections",
                                "altup_laurel", "vision", "audio", "embedders")}


def _ctx(folder, out, qtype="Q6_K", importance=None):
    r = parse_recipe({
        "name": "t", "model": str(folder), "output": "out/t", "towers": {**KEEP_ALL, "text": "int4"},
        "exports": {"gguf": {"mix": "auto", "mmproj": False, "tensor_types": [{"match": [GGUF_TABLE], "type": qtype}]}},
    })
    ck = Checkpoint(folder)
    src = TensorSource(ck, build_plan(r, ck), importance=importance or {})
    return ExportContext(r, src, Path(out), {"recipe": "t", "model": str(folder)}), r.exports.gguf


def _ggml_table(folder, qtype, importance=None) -> np.ndarray:
    w = Checkpoint(folder).get(TABLE).to(torch.float32).numpy()
    return quantize_rows(w, qtype, importance, threads=1)


def _table_bytes(path, expected: np.ndarray) -> np.ndarray:
    """The GGUF table's rows of the checkpoint's table (the file pads it to the vocabulary)."""
    t = {x.name: x for x in GGUFReader(path).tensors}[GGUF_TABLE]
    return np.asarray(t.data).reshape(-1)[:expected.size].reshape(expected.shape)


@pytest.fixture(scope="module")
def plain(tiny_random, tmp_path_factory):
    """The text GGUF as the writer writes it with nothing encoded ahead."""
    ctx, opts = _ctx(tiny_random, tmp_path_factory.mktemp("plain"))
    (path,) = write_gguf(ctx, opts)
    return path


@pytest.mark.parametrize("limit", [0, 1, 3, None])
def test_pieces_encoded_ahead_give_the_writers_file(tiny_random, tmp_path, plain, limit, caplog):
    """The tiny per-layer table (4096 x 6400) is 4 pieces: none, some or all of them encoded
    ahead, the writer copies those and packs the rest, and the file is the plain one; the
    table is ggml's own Q6_K of the checkpoint's rows."""
    ctx, opts = _ctx(tiny_random, tmp_path)
    pre = PreEncoder(ctx, opts, tmp_path / ".pre")
    assert [t.gguf for t in pre.targets] == [GGUF_TABLE]  # token_embd is one piece: not worth it
    (tmp_path / ".pre").mkdir()
    done = pre.encode(threading.Event(), limit=limit)
    assert done == (4 if limit is None else limit)
    with caplog.at_level(logging.INFO, logger="quantize.formats.gguf.preencode"):
        (path,) = write_gguf(dataclasses.replace(ctx, preencoded=pre), opts)
    assert (f"{done} of 4 pieces encoded" in caplog.text) == (done > 0)
    assert path.read_bytes() == plain.read_bytes()
    want = _ggml_table(tiny_random, T.Q6_K)
    np.testing.assert_array_equal(_table_bytes(path, want), want)


def test_the_writer_ignores_what_no_longer_applies(tiny_random, tmp_path):
    """Pieces encoded for a target the final plan gives another type, or for a source that
    gained importance statistics, are not taken: the writer encodes the final plan itself."""
    ctx, opts = _ctx(tiny_random, tmp_path / "a")
    pre = PreEncoder(ctx, opts, tmp_path / ".pre")
    (tmp_path / ".pre").mkdir()
    assert pre.encode(threading.Event()) == 4

    imp = torch.rand(6400, generator=torch.Generator().manual_seed(0)) + 0.1
    ctx_imp, opts_imp = _ctx(tiny_random, tmp_path / "b", importance={TABLE: imp})
    target = next(t for t in pre.targets)
    assert pre.take(target, ctx.source) is not None
    assert pre.take(target, ctx_imp.source) is None
    (path,) = write_gguf(dataclasses.replace(ctx_imp, preencoded=pre), opts_imp)
    want = _ggml_table(tiny_random, T.Q6_K, imp.numpy())
    np.testing.assert_array_equal(_table_bytes(path, want), want)

    ctx3, opts3 = _ctx(tiny_random, tmp_path / "c", qtype="Q3_K")
    (path,) = write_gguf(dataclasses.replace(ctx3, preencoded=pre), opts3)
    want = _ggml_table(tiny_random, T.Q3_K)
    np.testing.assert_array_equal(_table_bytes(path, want), want)


@pytest.mark.parametrize("qtype, weighted, expected", [
    ("Q6_K", False, True), ("Q3_K", False, True), ("Q6_K", True, False), ("Q5_K", True, False),
    ("Q5_K", False, False), ("Q4_K", False, False), ("Q8_0", False, False), ("Q4_0", False, False)])
def test_only_plain_targets_ggml_encodes_are_encoded_ahead(tiny_random, tmp_path, qtype, weighted, expected):
    """The compiled K-quants (Q4_K / Q5_K) and numpy's Q8_0 / Q4_0 are left to the export, and
    so is a source with importance (the writer would not take those pieces); ggml's plain
    K-quants are encoded ahead."""
    imp = {TABLE: torch.ones(6400)} if weighted else None
    ctx, opts = _ctx(tiny_random, tmp_path, qtype=qtype, importance=imp)
    assert [t.gguf for t in PreEncoder(ctx, opts, tmp_path / ".pre").targets] == ([GGUF_TABLE] if expected else [])


def _calibrated_recipe(model, out, calibration, qtype="Q6_K"):
    from quantize.recipe import load_recipe

    r = load_recipe("recipes/demo.yaml", model=str(model), output=str(out))
    return r.model_validate({**r.model_dump(), "calibration": calibration,
                             "towers": {**r.towers.model_dump(), "text": "int4_gptq", "vision": "keep", "audio": "keep"},
                             "exports": {"gguf": {"mix": "auto", "mmproj": False,
                                                  "tensor_types": [{"match": [GGUF_TABLE], "type": qtype}]}}})


CALIBRATION = {"text": {"source": "embedded", "n_samples": 1, "seq_len": 32},
               "images": {"n_samples": 0}, "audio": {"n_samples": 0}}


def test_a_calibrated_run_encodes_the_table_beside_the_calibration(tiny_trained, tmp_path, monkeypatch):
    """In a calibrated run the pre-encoder works off the main thread at nice 19 (as the kernel
    reports it), the GGUF's table is ggml's Q6_K of the checkpoint's rows, and its folder is
    gone from the output and the manifest."""
    from quantize.pipeline import PREENCODE_DIR, run

    seen = []
    real = PreEncoder.encode

    def spy(self, stop, limit=None):
        seen.append((threading.current_thread() is threading.main_thread(),
                     os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        return real(self, stop, limit)

    monkeypatch.setattr(PreEncoder, "encode", spy)
    res = run(_calibrated_recipe(tiny_trained, tmp_path / "out", CALIBRATION), progress=False)
    assert seen == [(False, 19)]
    (gguf,) = [p for p in res.artifacts if p.suffix == ".gguf"]
    want = _ggml_table(tiny_trained, T.Q6_K)
    np.testing.assert_array_equal(_table_bytes(gguf, want), want)
    assert not (res.out_dir / PREENCODE_DIR).exists()
    assert not any(PREENCODE_DIR in f["path"] for f in res.manifest["artifacts"])
    assert not [t for t in threading.enumerate() if t.name.startswith("gguf-preencode")]


def test_a_calibrated_run_leaves_a_compiled_table_to_the_export(tiny_trained, tmp_path, monkeypatch):
    """recipes/int4.yaml's Q5_K table: nothing runs beside the calibration, and the GGUF's table
    is still ggml's Q5_K of the checkpoint's rows."""
    from quantize.pipeline import run

    seen = []
    real = PreEncoder.encode

    def spy(self, stop, limit=None):  # an error raised here would be swallowed by the background task
        seen.append([t.gguf for t in self.targets])
        return real(self, stop, limit)

    monkeypatch.setattr(PreEncoder, "encode", spy)
    res = run(_calibrated_recipe(tiny_trained, tmp_path / "out", CALIBRATION, qtype="Q5_K"), progress=False)
    assert seen == []
    (gguf,) = [p for p in res.artifacts if p.suffix == ".gguf"]
    want = _ggml_table(tiny_trained, T.Q5_K)
    np.testing.assert_array_equal(_table_bytes(gguf, want), want)


def test_a_failed_calibration_stops_the_preencoder(tiny_trained, tmp_path, monkeypatch):
    """The calibration raises: no pre-encoding thread is left and no output folder either."""
    import quantize.pipeline as pipeline

    def boom(*a, **k):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(pipeline, "_calibrate", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="calibration failed"):
        pipeline.run(_calibrated_recipe(tiny_trained, out, CALIBRATION), progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("gguf-preencode")]
    assert not out.exists() and list(tmp_path.iterdir()) == []
