#!/usr/bin/env bash
# Issue 8's GPU measurements and tests in one device call: "lanes" run side by side, one GPU each, every
# stage under its own time limit, results written to $OUT as they are produced.
#
#   here:   bash scripts/gpu_carry.sh            (builds .gpu_carry/, ~45 MB of xz tarballs)
#   device: run(kind="nvidia-h200-x4", carry=[".gpu_carry"],
#               command="timeout 590 bash benchmarks/gpu_suite.sh")
#   fewer GPUs: LANES="0:tp_gemma,tp_phi16,tp_phi4 1:epoch,test_train,test_pipeline" (stages of a lane
#   run in order; each lane gets CUDA_VISIBLE_DEVICES=<its GPU>).
#
# Stages:
#   tp_<case>      benchmarks/train_throughput.py --share-process --impl node,unsloth for one case group
#                  (the plain transformers numbers of benchmarks/results/train_throughput_h100_raw.json
#                  are reused): Unsloth compiles each decoder block on the first step of a new shape
#                  family (29-87 s seen), which is why cases are spread over lanes;
#   epoch          benchmarks/epoch_real_lengths.py: one epoch of FunctionGemma-270M on the real length
#                  distribution, reference recipe vs padding-free packing;
#   test_train     pytest -m gpu tests/test_training_gpu.py (unsloth + hf backends, 4-bit, packing);
#   test_pipeline  pytest -m gpu tests/gpu/ (the whole tiny pipeline on the GPU, the GPU site, the
#                  benchmark harness).
# Lanes share the host's CPUs: compile phases overlap, the timed steps are GPU-bound on separate GPUs.
set -uo pipefail
OUT=${OUT:-$PWD/benchmarks/results/gpu_suite}
mkdir -p "$OUT" "$OUT/logs"
source scripts/gpu_unpack.sh
LANES=${LANES:-"0:tp_gemma,tp_phi4 1:tp_phi16,tp_gemma4 2:epoch,test_train 3:test_pipeline"}
T_TP=${T_TP:-300} T_EPOCH=${T_EPOCH:-330} T_TEST=${T_TEST:-240} T_PIPE=${T_PIPE:-540}
t0=$(date +%s)
stamp() { echo "[suite $(($(date +%s) - t0))s gpu${CUDA_VISIBLE_DEVICES:-?}] $*" | tee -a "$OUT/suite.log"; }

declare -A TP_KEYS=(
  [gemma]="gemma-3-1b|nockpt|16bit|b8"
  [phi16]="phi-4-mini|ckpt|16bit|b8"
  [phi4]="phi-4-mini|ckpt|4bit|b8"
  [gemma4]="gemma-3-1b|nockpt|4bit|b8"
  [fg]="functiongemma-270m|ckpt|16bit|b16"
)

stage() {
  local s=$1 models=${TMPDIR:-/tmp}/dagtune_models_gpu${CUDA_VISIBLE_DEVICES}
  case $s in
  tp_*)
    local k=${s#tp_}
    stamp "throughput ${TP_KEYS[$k]} (limit ${T_TP}s)"
    timeout "$T_TP" python3 benchmarks/train_throughput.py --share-process --impl unsloth,node \
      --preset table --keys "${TP_KEYS[$k]}" --model-root "$models" --tokenizer-cache .bench_tokenizers \
      --deadline-s $((T_TP - 10)) --out "$OUT/tp_$k.json" --log "$OUT/logs/tp_$k.log" \
      >"$OUT/logs/tp_${k}_driver.log" 2>&1
    grep -aE "^\S+\|.*(ok|timeout|error|oom)" "$OUT/logs/tp_${k}_driver.log" | tail -4 | tee -a "$OUT/suite.log"
    ;;
  epoch)
    stamp "epoch on real lengths (limit ${T_EPOCH}s)"
    timeout "$T_EPOCH" python3 benchmarks/epoch_real_lengths.py --model functiongemma-270m \
      --distribution function_calling/with_distractors --model-root "$models" \
      --tokenizer-cache .bench_tokenizers --out "$OUT/epoch_real_lengths.json" >"$OUT/logs/epoch.log" 2>&1
    grep -aE "^(==|reference|packed|wrote)|Error" "$OUT/logs/epoch.log" | tail -8 | tee -a "$OUT/suite.log"
    ;;
  test_train | test_pipeline)
    local what=tests/test_training_gpu.py lim=$T_TEST
    [ "$s" = test_pipeline ] && what=tests/gpu && lim=$T_PIPE
    stamp "pytest $what (limit ${lim}s)"
    # SIGINT, not TERM: pytest then still prints the failures it has.
    timeout -s INT -k 15 "$lim" python3 -m pytest -m gpu -q -p no:cacheprovider -rs -s --tb=short \
      "$what" >"$OUT/logs/$s.log" 2>&1
    grep -avE "it/s\]|s/it\]" "$OUT/logs/$s.log" | grep -aE "passed|failed|error|FAILED|ERROR|^E |^\{" |
      tail -30 | tee -a "$OUT/suite.log"
    ;;
  esac
}

nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee -a "$OUT/suite.log"
for lane in $LANES; do
  (
    export CUDA_VISIBLE_DEVICES=${lane%%:*}
    IFS=, read -ra stages <<<"${lane#*:}"
    for s in "${stages[@]}"; do stage "$s"; done
  ) &
done
wait
stamp "done"
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$OUT/logs"
