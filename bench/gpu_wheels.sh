#!/usr/bin/env bash
# Prepare, on a machine with a package registry, what bench/gpu_check.sh installs on a GPU
# machine that reaches none (the device tool's H200: torch 2.11 and transformers 5.17 there, no
# gguf, pydantic, compressed-tensors, datasets, soundfile or llama-cpp-python). Writes .whl/ in
# the repository root (ignored through .git/info/exclude; carry it: run(carry=[".whl"])):
#   - wheels for CPython 3.12 x86-64 of the versions this project is tested with (pip show here);
#   - llama_cpp.tar.gz: this machine's llama-cpp-python package (ctypes bindings and the libggml
#     it built; PyPI has no Linux wheel and building it takes minutes). Its CPU code may use
#     this machine's instruction set: gpu_check.sh tries it first and says so if it cannot run.
# About 30 MiB in all (the device tool carries at most 64 MiB with the working tree).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=${PYTHON:-python}
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl

# Missing there (or too old: transformers), with their own missing needs.
# transformers checks huggingface-hub, tokenizers, safetensors and regex on import (its
# dependency_versions_check); huggingface-hub >= 2 brings httpx2 (2026-12-04: 1.33 was there).
PKGS="transformers gguf pydantic pydantic_core annotated-types typing-inspection typing_extensions
      compressed-tensors loguru datasets dill multiprocess soundfile cffi pycparser diskcache
      huggingface-hub httpx2 httpcore2 truststore h11 click hf-xet tokenizers safetensors regex"
pins=()
for p in $PKGS; do
  v=$($PY -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "gpu_wheels: $p is not installed here; install the project first (pip install -e '.[dev]')" >&2; exit 2; }
  pins+=("$p==$v")
done
plat=()
for n in 2_28 2_27 2_17 2014 1; do
  case $n in 2014|1) plat+=(--platform "manylinux${n}_x86_64") ;; *) plat+=(--platform "manylinux_${n}_x86_64") ;; esac
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "${pins[@]}"

# llama_cpp: its lib/ holds each library three times (copies, not links); keep one, link the rest.
site=$($PY -c 'import llama_cpp, os; print(os.path.dirname(os.path.dirname(llama_cpp.__file__)))')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r "$site/llama_cpp" "$tmp/" && rm -rf "$tmp/llama_cpp/__pycache__" "$tmp/llama_cpp/server"
(cd "$tmp/llama_cpp/lib" && for f in *.so.0; do b=${f%.0}; for g in "$b" "$b".0.*; do [ -e "$g" ] && ln -sf "$f" "$g"; done; done)
tar -C "$tmp" -czf .whl/llama_cpp.tar.gz llama_cpp
du -sh .whl
ls .whl
