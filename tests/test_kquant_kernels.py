"""ggml's plain Q4_K / Q5_K encoders compiled by numba (quantize/formats/gguf/kquant_kernels.py).

Reference: ggml's own ``ggml_quantize_chunk`` (llama-cpp-python's libggml-base) on the same
float rows, byte for byte; where ggml's bytes are not defined (the levels of a sub-block whose
scale is 0 in the file, which it leaves as its stack buffer held them) the header bytes must
match and the blocks must decode to the same values (gguf's own dequantizer)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from safetensors.numpy import load_file

from quantize.formats.gguf import kquant_kernels as kk, kquants
from quantize.formats.gguf.ggml_quants import quantize_rows

TYPES = list(kk.PARAMS)


def _weights(rng, rows=96, cols=1024):
    """Gaussian rows, heavy-tailed rows, an outlier column, one-signed rows: every sub-block has
    a nonzero scale in the file (checked by the callers' byte equality)."""
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.02
    w[1::5] = rng.standard_t(5, size=w[1::5].shape).astype(np.float32) * 0.02
    w[:, 7] *= 8
    w[2] = np.abs(w[2])
    w[3] = -np.abs(w[3])
    w[4] = w[4] * 1e3 + 5
    return w


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_are_ggmls(qtype):
    w = _weights(np.random.default_rng(0))
    np.testing.assert_array_equal(kk.encode(w, qtype), quantize_rows(w, qtype))


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_are_ggmls_on_trained_weights(qtype, tiny_trained):
    """The trained tiny model's per-layer table and a decoder matrix, as the writer encodes them."""
    tensors = load_file(str(tiny_trained / "model.safetensors"))
    for name in ("model.language_model.embed_tokens_per_layer.weight", "model.language_model.layers.0.mlp.down_proj.weight"):
        w = tensors[name].astype(np.float32)
        w = w.reshape(-1, w.shape[-1])
        np.testing.assert_array_equal(kk.encode(w, qtype, threads=2), quantize_rows(w, qtype), err_msg=name)


@pytest.mark.parametrize("qtype", TYPES)
def test_lanes_threads_and_ragged_groups_do_not_change_bytes(qtype):
    w = _weights(np.random.default_rng(1), rows=37, cols=768)  # 37 x 24 sub-blocks: no multiple of any lane count
    ref = quantize_rows(w, qtype)
    for lanes in (1, 16, 100, kk.LANES):
        np.testing.assert_array_equal(kk.encode(w, qtype, lanes=lanes), ref, err_msg=f"lanes={lanes}")
    np.testing.assert_array_equal(kk.encode(w, qtype, threads=2), ref)
    np.testing.assert_array_equal(kk.encode(w[:1, :256], qtype), ref[:1, :kk.PARAMS[qtype][4]])


@pytest.mark.parametrize("qtype", TYPES)
def test_zero_scale_sub_blocks_decode_as_ggmls(qtype):
    """Sub-blocks whose scale is 0 in the file: all zeros, constants, scales below fp16's range,
    and small sub-blocks beside a large one (their 6-bit scale rounds to 0). ggml's level bytes
    there are left over from its stack; the headers and the decoded values must agree."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 512)).astype(np.float32)
    w[0] = 0
    w[1] = 0.013
    w[2, :32] = 3.0  # one constant (positive) sub-block
    w[3] *= 1e-9  # d underflows fp16
    w[4, 1:32] *= 1e-4  # sub-block 0 holds one large value, the rest of the super-block is tiny
    w[4, 32:256] *= 1e-4
    w[5, :256] = -2.0
    ours, ref = kk.encode(w, qtype), quantize_rows(w, qtype)
    np.testing.assert_array_equal(ours.reshape(-1, kk.PARAMS[qtype][4])[:, :16], ref.reshape(-1, kk.PARAMS[qtype][4])[:, :16])
    np.testing.assert_array_equal(dequantize(ours, qtype), dequantize(ref, qtype))


@pytest.mark.parametrize("qtype", TYPES)
def test_rows_outside_nearest_ints_range_are_ggmls(qtype):
    """A super-block whose first sub-block is -1e6 (dmin about 15873) and second -7000 plus a
    spread of 0.01: the second's 6-bit min rounds to 0, so its levels' rounding argument is about
    -7000 / 3e-4, beyond the range where ggml's rounding trick is round-to-nearest (its result
    there is garbage, clamped): the row goes to ggml."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 512)).astype(np.float32)
    w[2, :32] = -1e6
    w[2, 32:256] = -7000 + rng.uniform(0, 0.01, 224).astype(np.float32)
    _, redo = kk._encode_chunk(np.ascontiguousarray(w), qtype, kk.LANES)
    assert redo.tolist() == [2]
    np.testing.assert_array_equal(kk.encode(w, qtype), quantize_rows(w, qtype))


def test_encode_kquant_takes_the_kernels_without_importance_only():
    """With importance ggml's weighted search (``quantize_row_q5_K_impl``) runs, not the kernels."""
    rng = np.random.default_rng(4)
    w = _weights(rng, rows=16, cols=512)
    imp = rng.uniform(0.1, 10, 512).astype(np.float32)
    for qtype in TYPES:
        np.testing.assert_array_equal(kquants.encode_kquant(w, qtype), quantize_rows(w, qtype))
        np.testing.assert_array_equal(kquants.encode_kquant(w, qtype, imp), quantize_rows(w, qtype, imp))
        assert not np.array_equal(kquants.encode_kquant(w, qtype, imp), kquants.encode_kquant(w, qtype))


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="300 columns do not split into Q5_K blocks of 256"):
        kk.encode(np.zeros((2, 300), np.float32), T.Q5_K)
    with pytest.raises(ValueError, match="encodes Q4_K, Q5_K, not Q6_K"):
        kk.encode(np.zeros((2, 256), np.float32), T.Q6_K)
