#!/usr/bin/env bash
# Build .gpu_site/: a plain site directory holding the GPU-only training stack (Unsloth and friends)
# for the lent GPU machine (Python 3.12, torch 2.11 CUDA 13, transformers 5.17, peft, accelerate,
# triton already installed there; no internet there). Run this here, where pip can reach the index;
# the device run then does:
#     export PYTHONPATH=$PWD/.gpu_site:$PWD        (with carry: [".gpu_site"])
#
# Wheels land in .whl/ (cached; re-runs download only what is missing), are unzipped into .gpu_site/,
# and pruned to fit a transfer (<= ~64 MiB with the working tree):
#   - unsloth's studio/ (web UI, ~84 MB) and unsloth_cli/ are dropped: not needed for training;
#   - bitsandbytes keeps only libbitsandbytes_cuda130.so (+ the tiny cpu one); ROCm/XPU/other CUDA go;
#   - diffusers, torchao, hf_transfer are NOT shipped (unsloth imports them lazily / inside try);
#   - __pycache__ removed.
# xformers 0.0.35 is built for torch 2.10+cu128: on the device's torch 2.11+cu130 it does not load and
# Unsloth says so and uses PyTorch attention (seen 2026-11-21, H100). It is kept because the project
# pins it (pyproject's gpu extra); GPU_SITE_SKIP_XFORMERS=1 leaves it out (13 MB less, same speed).
# Each wheel's Requires-Dist was checked against the device's package list (KINDS.md); what is missing
# there is listed below (tyro's, datasets' and importlib_metadata's own needs included).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=${DAGTUNE_WHL_DIR:-.whl}
SITE=${DAGTUNE_GPU_SITE:-.gpu_site}

PKGS=(
  unsloth==2026.10.7
  unsloth_zoo==2026.10.7
  bitsandbytes==0.50.2
  xformers==0.0.35
  cut_cross_entropy==25.1.1
  trl==1.15.0
  datasets==4.8.5
  dill==0.4.0              # datasets: dill<0.4.2; multiprocess 0.70.18: dill>=0.4.0
  multiprocess==0.70.18
  tyro==1.0.17
  docstring_parser==0.18.0 # tyro
  typeguard==4.6.0         # tyro
  msgspec==0.22.0          # unsloth_zoo (cp312 binary)
  nest_asyncio==1.6.0
  structlog==26.1.0
  importlib_metadata==8.7.0  # 10.x needs lazy-importer; 8.7 needs only zipp (on the device)
)

if [ "${GPU_SITE_SKIP_XFORMERS:-0}" = 1 ]; then
  PKGS=("${PKGS[@]/xformers==0.0.35/}")
fi

mkdir -p "$WHL"
for spec in "${PKGS[@]}"; do
  [ -n "$spec" ] || continue
  name=${spec%%==*}; ver=${spec##*==}
  norm=$(echo "$name" | tr '-' '_')
  if ls "$WHL"/"$norm"-"$ver"-*.whl >/dev/null 2>&1; then continue; fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$WHL" "$spec"
done

rm -rf "$SITE"
mkdir -p "$SITE"
for spec in "${PKGS[@]}"; do
  [ -n "$spec" ] || continue
  name=${spec%%==*}; ver=${spec##*==}
  norm=$(echo "$name" | tr '-' '_')
  files=("$WHL"/"$norm"-"$ver"-*.whl)
  [ ${#files[@]} -eq 1 ] || { echo "gpu_site: expected one wheel for $spec, found ${files[*]}" >&2; exit 1; }
  "$PY" - "${files[0]}" "$SITE" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist()
             if not n.startswith(("studio/", "unsloth_cli/"))
             and not (n.startswith("bitsandbytes/libbitsandbytes_")
                      and n not in ("bitsandbytes/libbitsandbytes_cuda130.so",
                                    "bitsandbytes/libbitsandbytes_cpu.so"))]
    z.extractall(sys.argv[2], members=names)
EOF
done
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
# Wheels' RECORD files still list the dropped files; nothing reads them at import time.

# A relative PYTHONPATH must not pick up a stale install: fail loudly if something expected is missing.
for mod in unsloth unsloth_zoo bitsandbytes cut_cross_entropy trl datasets dill multiprocess \
           tyro docstring_parser typeguard msgspec nest_asyncio.py structlog importlib_metadata; do
  [ -e "$SITE/$mod" ] || { echo "gpu_site: $mod missing from $SITE" >&2; exit 1; }
done
[ -e "$SITE/bitsandbytes/libbitsandbytes_cuda130.so" ] || { echo "gpu_site: bitsandbytes CUDA 13.0 library missing" >&2; exit 1; }
echo "gpu_site: $(du -sh "$SITE" | cut -f1) in $SITE ($(ls -d "$SITE"/*.dist-info | wc -l) distributions)"
echo "gpu_site: on the device: export PYTHONPATH=\$PWD/$SITE:\$PWD   (run with carry: [\"$SITE\"])"
