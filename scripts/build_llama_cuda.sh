#!/usr/bin/env bash
# Build llama.cpp's shared libraries with the CUDA backend, from the sources of the pinned
# llama-cpp-python (its vendored llama.cpp), for a GPU worker: llama-cpp-python loads them in place of
# its CPU-only ones through LLAMA_CPP_LIB_PATH, so convert_gguf's parity check runs llama.cpp on the GPU.
# (A worker image can instead install llama-cpp-python with CMAKE_ARGS="-DGGML_CUDA=on": the same build.)
#
#   scripts/build_llama_cuda.sh SRC OUT_DIR
#     SRC      the llama-cpp-python sdist (.tar.gz), or a tarball of its vendor/llama.cpp
#              (scripts/gpu_carry.sh packs one as .gpu_carry/llama_src.tar.xz)
#     OUT_DIR  gets libllama.so, libggml*.so; then: export LLAMA_CPP_LIB_PATH=OUT_DIR
# Knobs: CUDA_ARCH (default 90: Hopper), JOBS (default: all cores).
set -euo pipefail
SRC=${1:?usage: build_llama_cuda.sh SRC OUT_DIR}
OUT_DIR=${2:?usage: build_llama_cuda.sh SRC OUT_DIR}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llama_cuda.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
tar -C "$WORK" -xf "$SRC"
TREE=$(dirname "$(find "$WORK" -maxdepth 4 -name CMakeLists.txt -path '*llama.cpp/CMakeLists.txt' | head -n1)")
[ -f "$TREE/CMakeLists.txt" ] || { echo "build_llama_cuda: no llama.cpp tree in $SRC" >&2; exit 1; }
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
# The CUDA runtime and cuBLAS are found next to the toolkit that built the libraries.
CUDA_LIB=$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd)
RPATH="\$ORIGIN;$CUDA_LIB/lib64;$CUDA_LIB/lib;$CUDA_LIB/targets/x86_64-linux/lib"
t0=$(date +%s)
cmake -S "$TREE" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH="$RPATH" >"$WORK/configure.log" 2>&1 \
  || { tail -40 "$WORK/configure.log" >&2; exit 1; }
cmake --build "$WORK/build" --target llama -j "${JOBS:-$(nproc)}" >"$WORK/build.log" 2>&1 \
  || { grep -aE 'error|FAILED' "$WORK/build.log" | head -40 >&2; tail -20 "$WORK/build.log" >&2; exit 1; }
mkdir -p "$OUT_DIR.partial"
find "$WORK/build" -name 'lib*.so*' -exec cp -a {} "$OUT_DIR.partial/" \;
rm -rf "$OUT_DIR"; mv "$OUT_DIR.partial" "$OUT_DIR"
echo "build_llama_cuda: $(ls "$OUT_DIR" | tr '\n' ' ')in $(($(date +%s) - t0))s -> $OUT_DIR"
