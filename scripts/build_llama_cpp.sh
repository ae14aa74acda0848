#!/usr/bin/env bash
# Build llama-cpp-python from source (portable CPU wheel) and extract llama.cpp's own
# HF -> GGUF converter (convert_hf_to_gguf.py + gguf-py) from the same sdist.
#
# Idempotent:
#   1. a wheel already in .wheels/ or in the wheel cache ($DAGTUNE_WHEEL_CACHE, default
#      ~/.cache/dagtune/wheels) is reused (and mirrored to the other place);
#   2. otherwise the sdist is fetched from PyPI into .wheels/src/ and built with
#      CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" (~200 s on 2 cores);
#   3. the converter tools (convert_hf_to_gguf.py, conversion/, gguf-py/) are extracted from the sdist into
#      $DAGTUNE_WHEEL_CACHE/llama_cpp_tools-<version>/ and .state/llama_cpp_tools/;
#   4. the wheel is installed into $PYTHON's environment (default .venv/bin/python),
#      unless DAGTUNE_SKIP_INSTALL=1.
#
# Usage: scripts/build_llama_cpp.sh            (from anywhere; paths are repo-relative)
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
WHEEL_DIR="$ROOT/.wheels"
SRC_DIR="$WHEEL_DIR/src"
CACHE_DIR="${DAGTUNE_WHEEL_CACHE:-$HOME/.cache/dagtune/wheels}"
TOOLS_CACHE="$CACHE_DIR/llama_cpp_tools-$VERSION"
TOOLS_LOCAL="$ROOT/.state/llama_cpp_tools"
SDIST_NAME="llama_cpp_python-$VERSION.tar.gz"
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"

mkdir -p "$WHEEL_DIR" "$SRC_DIR" "$CACHE_DIR"
log() { echo "[build_llama_cpp] $*" >&2; }

find_wheel() { compgen -G "$1/llama_cpp_python-$VERSION-*.whl" | head -n1 || true; }

fetch_sdist() {
  local sdist
  sdist="$(compgen -G "$SRC_DIR/llama_cpp_python-$VERSION.tar.gz" | head -n1 || true)"
  if [[ -z "$sdist" && -f "$CACHE_DIR/$SDIST_NAME" ]]; then
    cp "$CACHE_DIR/$SDIST_NAME" "$SRC_DIR/"
    sdist="$SRC_DIR/$SDIST_NAME"
  fi
  if [[ -z "$sdist" ]]; then
    log "downloading sdist llama-cpp-python==$VERSION"
    # Only this package from source: `--no-binary :all:` also builds the build backends' own build
    # dependencies from source, recursively (setuptools-scm, hatch-vcs, ...): in a clean image that chain
    # had not finished after 6 minutes.
    "$PYTHON" -m pip download --no-deps --no-binary llama-cpp-python -d "$SRC_DIR" "llama-cpp-python==$VERSION" >&2
    sdist="$SRC_DIR/$SDIST_NAME"
  fi
  [[ -f "$sdist" ]] || { log "sdist not found after download"; exit 1; }
  [[ -f "$CACHE_DIR/$SDIST_NAME" ]] || cp "$sdist" "$CACHE_DIR/"
  echo "$sdist"
}

# 1. wheel: local -> cache -> build
WHEEL="$(find_wheel "$WHEEL_DIR")"
if [[ -z "$WHEEL" ]]; then
  CACHED="$(find_wheel "$CACHE_DIR")"
  if [[ -n "$CACHED" ]]; then
    log "reusing cached wheel $CACHED"
    cp "$CACHED" "$WHEEL_DIR/"
    WHEEL="$WHEEL_DIR/$(basename "$CACHED")"
  fi
fi
if [[ -z "$WHEEL" ]]; then
  SDIST="$(fetch_sdist)"
  log "building wheel from $SDIST with CMAKE_ARGS='$CMAKE_ARGS' (several minutes)"
  start=$(date +%s)
  "$PYTHON" -m pip wheel --no-deps -w "$WHEEL_DIR" "$SDIST" >&2
  log "wheel built in $(($(date +%s) - start)) s"
  WHEEL="$(find_wheel "$WHEEL_DIR")"
  [[ -n "$WHEEL" ]] || { log "wheel build produced no file"; exit 1; }
else
  log "reusing wheel $WHEEL"
fi
[[ -n "$(find_wheel "$CACHE_DIR")" ]] || cp "$WHEEL" "$CACHE_DIR/"

# 2. converter tools from the sdist: convert_hf_to_gguf.py is a thin driver since mid-2026, the
#    per-architecture code lives in the sibling package conversion/, and gguf-py/ is the matching gguf.
if [[ ! -f "$TOOLS_CACHE/convert_hf_to_gguf.py" || ! -d "$TOOLS_CACHE/gguf-py/gguf" ]] ||
  { grep -q "^from conversion import" "$TOOLS_CACHE/convert_hf_to_gguf.py" && [[ ! -d "$TOOLS_CACHE/conversion" ]]; }; then
  SDIST="$(fetch_sdist)"
  log "extracting llama.cpp converter from $SDIST"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  prefix="llama_cpp_python-$VERSION/vendor/llama.cpp"
  tar -xzf "$SDIST" -C "$tmp" "$prefix/convert_hf_to_gguf.py" "$prefix/gguf-py"
  # conversion/ only exists in newer llama.cpp trees; tolerate its absence in older sdists
  tar -xzf "$SDIST" -C "$tmp" "$prefix/conversion" 2>/dev/null || true
  rm -rf "$TOOLS_CACHE"
  mkdir -p "$TOOLS_CACHE"
  cp "$tmp/$prefix/convert_hf_to_gguf.py" "$TOOLS_CACHE/"
  cp -r "$tmp/$prefix/gguf-py" "$TOOLS_CACHE/gguf-py"
  [[ -d "$tmp/$prefix/conversion" ]] && cp -r "$tmp/$prefix/conversion" "$TOOLS_CACHE/conversion"
  echo "$VERSION" >"$TOOLS_CACHE/LLAMA_CPP_PYTHON_VERSION"
fi
mkdir -p "$(dirname "$TOOLS_LOCAL")"
if [[ ! -f "$TOOLS_LOCAL/convert_hf_to_gguf.py" ]] ||
  ! cmp -s "$TOOLS_LOCAL/LLAMA_CPP_PYTHON_VERSION" "$TOOLS_CACHE/LLAMA_CPP_PYTHON_VERSION"; then
  rm -rf "$TOOLS_LOCAL"
  cp -r "$TOOLS_CACHE" "$TOOLS_LOCAL"
fi

# 3. install
if [[ "${DAGTUNE_SKIP_INSTALL:-0}" != "1" ]]; then
  if "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$VERSION')" 2>/dev/null; then
    log "llama-cpp-python $VERSION already installed in $PYTHON"
  else
    log "installing $WHEEL"
    # runtime deps (numpy, typing-extensions, diskcache, jinja2) come from the registry
    "$PYTHON" -m pip install "$WHEEL" >&2
  fi
fi

log "wheel:  $WHEEL"
log "tools:  $TOOLS_LOCAL (cache: $TOOLS_CACHE)"
echo "$WHEEL"
