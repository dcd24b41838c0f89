"""llama.cpp's own ``convert_hf_to_gguf.py``, from the sdist of the installed llama-cpp-python.

The independent reference for what a GGUF of a Gemma 3n folder should hold (metadata,
vocabulary, tensor names and values): the converter of exactly the llama.cpp whose runtime the
tests load our files with. Found in ``$LLAMACPP_SDIST_DIR`` (an unpacked sdist), in the bench's
tool cache (bench/build_llamacpp_tools.sh), or fetched once with ``pip download`` (a package
registry, as the install itself; pip's cache usually holds it since the install built it) and
cached as just the converter, its ``conversion`` package and its gguf-py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


class ConverterUnavailable(RuntimeError):
    pass


def _version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def _found(llama_dir: Path) -> Path | None:
    return llama_dir if (llama_dir / "convert_hf_to_gguf.py").is_file() else None


def converter_dir() -> Path:
    """The folder holding ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/``."""
    from quantize.tiny import default_cache_dir

    ver = _version()
    env = os.environ.get("LLAMACPP_SDIST_DIR")
    for cand in ([Path(env) / "vendor" / "llama.cpp"] if env else []) + [
        ROOT / ".cache" / "llama.cpp-tools" / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp",
        default_cache_dir() / f"llama-cpp-converter-{ver}",
    ]:
        if _found(cand):
            return cand
    target = default_cache_dir() / f"llama-cpp-converter-{ver}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
             f"llama-cpp-python=={ver}"],
            capture_output=True, text=True, timeout=900,
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode != 0 or not sdists:
            raise ConverterUnavailable(f"pip download llama-cpp-python=={ver} failed: {got.stderr.strip()[-300:]}")
        prefix = f"{sdists[0].name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        unpacked = Path(tmp) / "converter"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(KEEP) and (m.isfile() or m.isdir())]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(unpacked, members=members, filter="data")
        if not _found(unpacked):
            raise ConverterUnavailable(f"{sdists[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
        try:
            os.replace(unpacked, target)  # atomic: a concurrent test process may have won the race
        except OSError:
            if not _found(target):
                raise
            shutil.rmtree(unpacked, ignore_errors=True)
    return target


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
