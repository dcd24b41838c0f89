"""llama.cpp's own quantizer, as the benchmarks call it.

- ``quantize_plain``: ``llama_model_quantize`` through llama-cpp-python (no extra build needed);
- ``compute_imatrix`` / ``quantize_with_imatrix``: the ``llama-imatrix`` and ``llama-quantize``
  tools built by ``bench/build_llamacpp_tools.sh`` from the installed llama-cpp-python's sdist;
- ``Tools.converter``: the vendored ``convert_hf_to_gguf.py`` (with its own gguf-py).

Every tool runs with an explicit thread count; a failure raises ``BenchError`` with the
command and the tail of its output.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TOOLS = Path(".cache/llama.cpp-tools/tools.json")

FTYPES = {"Q8_0": 7, "Q4_0": 2, "Q3_K_M": 12, "Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q6_K": 18, "F16": 1}


class BenchError(RuntimeError):
    pass


@dataclass
class Tools:
    bin: Path | None
    converter: Path | None
    gguf_py: Path | None
    version: str

    def exe(self, name: str) -> Path:
        if self.bin is None or not (self.bin / name).exists():
            raise BenchError(f"{name} is not built; run bench/build_llamacpp_tools.sh first (expected it in {self.bin})")
        return self.bin / name

    def has(self, name: str) -> bool:
        return self.bin is not None and (self.bin / name).exists()


def find_tools(manifest: str | Path = DEFAULT_TOOLS) -> Tools:
    """Tools from the build script's manifest; missing parts are None (reported where needed)."""
    import llama_cpp

    manifest = Path(manifest)
    if not manifest.exists():
        return Tools(None, None, None, llama_cpp.__version__)
    m = json.loads(manifest.read_text())
    if m.get("version") != llama_cpp.__version__:
        raise BenchError(f"{manifest}: tools built for llama-cpp-python {m.get('version')}, "
                         f"installed is {llama_cpp.__version__}; rebuild with bench/build_llamacpp_tools.sh")
    conv = Path(m["convert_hf_to_gguf"])
    return Tools(Path(m["bin"]), conv if conv.exists() else None, Path(m["gguf_py"]), m["version"])


def run_tool(cmd: list[str], log_path: Path | None = None, env: dict | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if log_path is not None:
        log_path.write_text(out)
    if proc.returncode != 0:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise BenchError(f"{' '.join(map(str, cmd))} failed with exit code {proc.returncode}:\n{tail}")
    return out


def quantize_plain(src: Path, dst: Path, qtype: str, threads: int) -> Path:
    """llama.cpp's quantizer without an importance matrix, in-process through llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = FTYPES[qtype]
    # Our GGUFs hold the KV-shared layers' dead k/v as Q1_0 zero placeholders: let llama.cpp
    # re-type them (it would otherwise refuse to "requantize" them).
    params.allow_requantize = True
    tmp = dst.with_name(dst.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise BenchError(f"llama_model_quantize({src} -> {qtype}) returned {rc}")
    os.replace(tmp, dst)
    return dst


def compute_imatrix(tools: Tools, model: Path, text_file: Path, out: Path, threads: int, n_ctx: int,
                    log_path: Path | None = None) -> Path:
    """``llama-imatrix`` over ``text_file`` in chunks of ``n_ctx`` tokens."""
    tmp = out.with_name(out.name + ".partial" + out.suffix)
    run_tool([tools.exe("llama-imatrix"), "-m", model, "-f", text_file, "-o", tmp, "-c", n_ctx, "-b", n_ctx,
              "-t", threads, "-ngl", 0, "--no-ppl"], log_path)
    os.replace(tmp, out)
    return out


def quantize_with_imatrix(tools: Tools, src: Path, dst: Path, qtype: str, imatrix: Path, threads: int,
                          log_path: Path | None = None) -> Path:
    tmp = dst.with_name(dst.name + ".partial")
    run_tool([tools.exe("llama-quantize"), "--allow-requantize", "--imatrix", imatrix, src, tmp, qtype, threads], log_path)
    os.replace(tmp, dst)
    return dst
