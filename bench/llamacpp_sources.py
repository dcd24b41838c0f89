"""llama.cpp's sources as vendored in the sdist of the *installed* llama-cpp-python.

The one place that downloads and unpacks them: bench/build_llamacpp_tools.sh builds the tools
(llama-quantize, llama-imatrix, ...) from them, tests/llamacpp_converter.py runs their
``convert_hf_to_gguf.py``; both are then exactly the llama.cpp whose runtime loads our files.
Network: a package registry (``pip download``; pip's cache usually holds the sdist since the
install built it from there), once per version and target.

    python bench/llamacpp_sources.py TARGET   # unpack vendor/llama.cpp into TARGET, print it
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


class SourcesUnavailable(RuntimeError):
    pass


def version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def unpack_sources(target: Path, keep: tuple[str, ...] | None = None, marker: str = "CMakeLists.txt") -> Path:
    """``vendor/llama.cpp`` of the installed version's sdist, unpacked into ``target`` (only the
    paths starting with one of ``keep``, when given), unless ``target/marker`` is already there.
    The folder appears whole or not at all (a concurrent process may win the race)."""
    target = Path(target)
    if (target / marker).is_file():
        return target
    ver = version()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
             f"llama-cpp-python=={ver}"],
            capture_output=True, text=True, timeout=900,
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode != 0 or not sdists:
            raise SourcesUnavailable(f"pip download llama-cpp-python=={ver} failed: {got.stderr.strip()[-300:]}")
        prefix = f"{sdists[0].name[:-len('.tar.gz')]}/vendor/llama.cpp/"
        unpacked = Path(tmp) / "llama.cpp"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and (keep is None or m.name[len(prefix):].startswith(keep))
                       and (m.isfile() or m.isdir() or m.issym())]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(unpacked, members=members, filter="data")
        if not (unpacked / marker).is_file():
            raise SourcesUnavailable(f"{sdists[0].name} has no vendor/llama.cpp/{marker}")
        try:
            os.replace(unpacked, target)
        except OSError:
            if not (target / marker).is_file():
                raise
            shutil.rmtree(unpacked, ignore_errors=True)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/llamacpp_sources.py TARGET")
    try:
        print(unpack_sources(Path(sys.argv[1])))
    except SourcesUnavailable as e:
        sys.exit(str(e))
