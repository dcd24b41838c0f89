#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix,
# llama-perplexity, llama-bench) from the sdist of the *installed*
# llama-cpp-python, so that the quantizer we compare against is exactly the
# llama.cpp our artifacts are evaluated with.
#
# Usage: bench/build_llamacpp_tools.sh [CACHE_DIR]
#   CACHE_DIR defaults to .cache/llama.cpp-tools (git-ignored).
#   LLAMACPP_SDIST_DIR=/path/to/unpacked/sdist skips the download.
#   JOBS (default 2) sets the build parallelism.
# Network (PyPI) is needed only for the download; the benchmarks run offline.
set -euo pipefail

CACHE_DIR="${1:-.cache/llama.cpp-tools}"
JOBS="${JOBS:-2}"
VER="$(python -c 'import llama_cpp; print(llama_cpp.__version__)')"
mkdir -p "$CACHE_DIR"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"
if [[ -n "${LLAMACPP_SDIST_DIR:-}" ]]; then
    LLAMA="$LLAMACPP_SDIST_DIR/vendor/llama.cpp"
else
    # bench/llamacpp_sources.py: the one downloader of the sdist (tests' converter uses it too)
    LLAMA="$(python "$(dirname "$0")/llamacpp_sources.py" "$CACHE_DIR/llama.cpp-$VER")"
fi
[[ -f "$LLAMA/CMakeLists.txt" ]] || { echo "no llama.cpp sources at $LLAMA" >&2; exit 1; }

BUILD="$CACHE_DIR/build-$VER"
cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF
nice -n 10 cmake --build "$BUILD" -j "$JOBS" \
    --target llama-quantize llama-imatrix llama-perplexity llama-bench

# A small manifest the benchmarks read: where the tools and the converter are.
cat > "$CACHE_DIR/tools.json" <<JSON
{"version": "$VER",
 "bin": "$BUILD/bin",
 "convert_hf_to_gguf": "$LLAMA/convert_hf_to_gguf.py",
 "gguf_py": "$LLAMA/gguf-py"}
JSON
echo "tools in $BUILD/bin; manifest $CACHE_DIR/tools.json"
