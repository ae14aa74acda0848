#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install what the pipeline needs.
# Idempotent: a stamp holding the hash of the dependency files skips the install when nothing changed.
# CPU installs pin torch through constraints/cpu.txt (an unpinned torch pulls gigabytes of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DAGTUNE_VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${DAGTUNE_EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.dagtune-installed"
want=$(cat pyproject.toml constraints/cpu.txt scripts/setup_env.sh | sha256sum | cut -c1-16)-$EXTRAS
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into $VENV (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  "$VENV/bin/python" -m pip install -q -c constraints/cpu.txt -e ".[$EXTRAS]"
  "$VENV/bin/python" -m pip check >&2
  echo "$want" >"$stamp"
fi
# llama-cpp-python built from source (reused from .wheels/ or ~/.cache/dagtune/wheels when the pin is
# unchanged) and llama.cpp's own converter from the same sdist: needed by convert_gguf and its tests.
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null || [ ! -f .state/llama_cpp_tools/convert_hf_to_gguf.py ]; then
  PYTHON="$VENV/bin/python" bash scripts/build_llama_cpp.sh
fi
