"""llama.cpp's own ``convert_hf_to_gguf.py``, from the sdist of the installed llama-cpp-python.

The independent reference for what a GGUF of a Gemma 3n folder should hold (metadata,
vocabulary, tensor names and values): the converter of exactly the llama.cpp whose runtime the
tests load our files with. Found in ``$LLAMACPP_SDIST_DIR`` (an unpacked sdist), in the bench's
tool cache (bench/build_llamacpp_tools.sh), or unpacked once by bench/llamacpp_sources.py (the
one downloader of the sdist) as just the converter, its ``conversion`` package and its gguf-py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.llamacpp_sources import SourcesUnavailable, unpack_sources, version  # noqa: E402

KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


ConverterUnavailable = SourcesUnavailable


def _found(llama_dir: Path) -> Path | None:
    return llama_dir if (llama_dir / "convert_hf_to_gguf.py").is_file() else None


def converter_dir() -> Path:
    """The folder holding ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``."""
    from quantize.tiny import default_cache_dir

    ver = version()
    env = os.environ.get("LLAMACPP_SDIST_DIR")
    for cand in ([Path(env) / "vendor" / "llama.cpp"] if env else []) + [
        ROOT / ".cache" / "llama.cpp-tools" / f"llama.cpp-{ver}",
        default_cache_dir() / f"llama-cpp-converter-{ver}",
    ]:
        if _found(cand):
            return cand
    return unpack_sources(default_cache_dir() / f"llama-cpp-converter-{ver}", keep=KEEP, marker="convert_hf_to_gguf.py")


def convert(model: Path, out: Path, outtype: str = "f32", extra: list[str] = ()) -> Path:
    """Run the converter on ``model`` with its own gguf-py (``extra``: more flags, ``--mmproj``);
    returns ``out``."""
    conv = converter_dir()
    env = dict(os.environ, PYTHONPATH=str(conv / "gguf-py"))
    got = subprocess.run(
        [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model), "--outtype", outtype, "--outfile", str(out),
         *extra],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if got.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model}:\n{got.stderr[-2000:]}")
    return out
