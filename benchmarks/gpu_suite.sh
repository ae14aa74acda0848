#!/usr/bin/env bash
# Issue 8's GPU measurements and tests, each stage under its own time limit so a slow one cannot starve
# the rest; results land in $OUT as they are produced.
#
#   run (device tool), carry [".gpu_site", ".gpu_pytest", ".bench_tokenizers"], e.g. in two calls:
#     STAGES="tp" T_TP=560 timeout 580 bash benchmarks/gpu_suite.sh
#     STAGES="epoch test" T_EPOCH=400 T_TEST=170 timeout 580 bash benchmarks/gpu_suite.sh
#
# What it costs (H200, 2026-11-21, one call with 235/175/95 s limits, benchmarks/results/gpu_suite_h200.log):
# Unsloth compiles each decoder block as a region on the first training step of every new shape family:
# 28.7 s (node, FunctionGemma b16x1024), >30 s (node, Gemma-3-1B), 86.8 s (reference recipe's first
# padded step, FunctionGemma). The throughput stage needs ~60 s per model and implementation in one
# process (~6-7 min for the three priority configs), the epoch stage ~2.5 min per variant, pytest ~3 min.
#
#   1. benchmarks/train_throughput.py: node vs raw Unsloth (priority preset; the plain transformers
#      numbers of benchmarks/results/train_throughput_h100_raw.json are reused), all cases in one
#      process (--share-process: Unsloth's import + compile once, not once per case);
#   2. benchmarks/epoch_real_lengths.py: one epoch of FunctionGemma-270M on the real length
#      distributions, reference recipe vs packing;
#   3. pytest -m gpu tests/test_training_gpu.py (the unsloth path's new tests first).
# Stage limits (seconds): T_TP, T_EPOCH, T_TEST.
set -uo pipefail
OUT=${OUT:-$PWD/benchmarks/results/gpu_suite}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.gpu_site:$PWD/.gpu_pytest:$PWD
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
T_TP=${T_TP:-235} T_EPOCH=${T_EPOCH:-175} T_TEST=${T_TEST:-95}
STAGES=${STAGES:-tp epoch test}
has() { [[ " $STAGES " == *" $1 "* ]]; }
MODELS=${TMPDIR:-/tmp}/dagtune_suite_models
t0=$(date +%s)
stamp() { echo "[suite $(( $(date +%s) - t0 ))s] $*" | tee -a "$OUT/suite.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/suite.log"
if has tp; then
stamp "throughput (limit ${T_TP}s)"
timeout "$T_TP" python3 benchmarks/train_throughput.py --share-process --impl unsloth,node --preset priority \
  --keys "functiongemma-270m|ckpt|16bit|b16,gemma-3-1b|nockpt|16bit|b8,phi-4-mini|ckpt|16bit|b8" \
  --model-root "$MODELS" --tokenizer-cache .bench_tokenizers --deadline-s $((T_TP - 12)) \
  --out "$OUT/train_throughput.json" --log "$OUT/train_throughput.log" 2>&1 | tail -25 | tee -a "$OUT/suite.log"
fi

if has epoch; then
stamp "epoch on real lengths (limit ${T_EPOCH}s)"
timeout "$T_EPOCH" python3 benchmarks/epoch_real_lengths.py --model functiongemma-270m \
  --distribution function_calling/with_distractors,function_calling/own_tools \
  --model-root "$MODELS" --tokenizer-cache .bench_tokenizers --out "$OUT/epoch_real_lengths.json" \
  > "$OUT/epoch_real_lengths.log" 2>&1
grep -aE "^(==|reference|packed|wrote)|Error" "$OUT/epoch_real_lengths.log" | tail -20 | tee -a "$OUT/suite.log"
fi

if has test; then
stamp "pytest (limit ${T_TEST}s)"
# SIGINT, not TERM: pytest then still prints the failures it has (a TERM-killed run left only "F.").
timeout -s INT -k 15 "$T_TEST" python3 -m pytest -m gpu -q -p no:cacheprovider -rs --tb=short \
  "tests/test_training_gpu.py::test_unsloth_packed_sft_uses_varlen_attention" \
  "tests/test_training_gpu.py::test_unsloth_response_only_labels_match_completion_mask" \
  "tests/test_training_gpu.py::test_unsloth_4bit_lora_only_updates" \
  "tests/test_training_gpu.py::test_unsloth_backend_sft" \
  "tests/test_training_gpu.py::test_unsloth_backend_classifier" \
  "tests/test_training_gpu.py::test_hf_backend_nf4_sft" \
  "tests/test_training_gpu.py::test_hf_backend_nf4_classifier" > "$OUT/pytest.log" 2>&1
grep -av "it/s\]" "$OUT/pytest.log" | tail -40 | tee -a "$OUT/suite.log"
fi
stamp "done"
