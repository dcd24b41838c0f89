"""ggml's own quantizers, called in the ``libggml-base`` that llama-cpp-python ships.

``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` is what llama.cpp's
``llama-quantize`` runs for every tensor, so a block written here is byte for byte the block
llama.cpp writes for the same float weights and importance (``quantize_row_q4_K_impl`` and
friends with importance, ``quantize_row_*_ref`` without), at llama-quantize's own speed per core
(bench/kquant_speed.py). Rows are independent, so chunks of rows run on several threads (ctypes
releases the GIL) and the bytes do not depend on how many.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from quantize.errors import ExportError

CHUNK_ELEMENTS = 1 << 20  # values per call: a 4 MiB fp32 copy per thread, whatever the tensor


class GGMLLibraryError(ExportError):
    """llama-cpp-python's ggml library is missing or lacks the quantizer."""


def _candidates(lib_dir: Path) -> list[Path]:
    if sys.platform == "win32":
        return [lib_dir / "ggml-base.dll", lib_dir / "libggml-base.dll"]
    if sys.platform == "darwin":
        return [lib_dir / "libggml-base.dylib", lib_dir / "libggml-base.so"]
    return [lib_dir / "libggml-base.so"]


@functools.cache
def _lib() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")  # its lib/ folder, without loading llama itself
    if spec is None or spec.origin is None:
        raise GGMLLibraryError("K-quant types need ggml from llama-cpp-python, which is not installed "
                               "(pip install 'llama-cpp-python>=0.3.36')")
    lib_dir = Path(spec.origin).parent / "lib"
    found = [p for p in _candidates(lib_dir) if p.exists()]
    if not found:
        raise GGMLLibraryError(f"no ggml-base library in {lib_dir}: reinstall llama-cpp-python")
    lib = ctypes.CDLL(str(found[0]))
    try:
        fn = lib.ggml_quantize_chunk
    except AttributeError as e:
        raise GGMLLibraryError(f"{found[0]} has no ggml_quantize_chunk: llama-cpp-python is too old") from e
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    return lib


def quantize_rows(w: np.ndarray, qtype: T, importance: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """fp32-convertible (rows, cols) -> uint8 (rows, bytes per row) of ``qtype``, as ggml writes it.

    ``importance``: per-column weights (length cols; llama.cpp's imatrix: mean squared
    activation), or None for ggml's plain reference quantizer."""
    lib = _lib()
    rows, cols = w.shape
    block, size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{cols} columns do not split into {qtype.name} blocks of {block}")
    row_bytes = cols // block * size
    if lib.ggml_row_size(int(qtype), cols) != row_bytes:  # the gguf package and this ggml disagree on the layout
        raise GGMLLibraryError(f"ggml's {qtype.name} row of {cols} values is {lib.ggml_row_size(int(qtype), cols)} "
                               f"bytes, gguf says {row_bytes}: llama-cpp-python and gguf versions do not match")
    imp = None
    if importance is not None:
        imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        if imp.shape[0] != cols:
            raise ValueError(f"importance has {imp.shape[0]} entries for {cols} columns")
    elif lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs importance statistics")
    lib.ggml_quantize_init(int(qtype))  # once, before the threads (it builds lookup tables for some types)
    out = np.empty((rows, row_bytes), np.uint8)
    step = max(1, CHUNK_ELEMENTS // cols)
    imp_ptr = None if imp is None else imp.ctypes.data

    def run(r0: int) -> None:
        x = np.ascontiguousarray(w[r0:r0 + step], dtype=np.float32)
        n = x.shape[0]
        dst = out[r0:r0 + n]
        done = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, dst.ctypes.data, 0, n, cols, imp_ptr)
        if done != n * row_bytes:
            raise GGMLLibraryError(f"ggml_quantize_chunk wrote {done} bytes for {n} rows of {qtype.name}, expected {n * row_bytes}")

    for_row_chunks(rows, step, threads, run)
    return out


def for_row_chunks(rows: int, step: int, threads: int, run) -> None:
    """``run(r0)`` for r0 = 0, step, 2 step, ... < rows, on ``threads`` threads (the encoders
    release the GIL; each chunk writes its own rows of the output)."""
    starts = range(0, rows, step)
    if threads <= 1 or len(starts) == 1:
        for r0 in starts:
            run(r0)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for f in [pool.submit(run, r0) for r0 in starts]:
                f.result()
