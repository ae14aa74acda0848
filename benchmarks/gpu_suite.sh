#!/usr/bin/env bash
# Issue 8's GPU measurements and tests in one device call: "lanes" run side by side, one GPU each, every
# stage under its own time limit, results written to $OUT as they are produced.
#
#   here:   bash scripts/gpu_carry.sh            (builds .gpu_carry/, ~45 MB of xz tarballs)
#   device: run(kind="nvidia-h200-x4", carry=[".gpu_carry"],
#               command="timeout 590 bash benchmarks/gpu_suite.sh")
#   stages of a lane run in order, each lane with CUDA_VISIBLE_DEVICES=<its GPU>; the calls of 2026-11-21:
#     LANES="0:tp_gemma,tp_phi4 1:tp_phi16,tp_gemma4 2:epoch,test_train 3:test_pipeline"   (x4, 545 s)
#     LANES="0:test_pipeline 1:test_train,epoch_own 2:probe,test_gpu_dir 3:epoch_ext"      (x4, 481 s)
#   and of 2026-11-30 (all three implementations side by side, the packed == unpacked check):
#     LANES="0:test_packed,tp_gemma 1:tp_phi16,tp_fg" TP_IMPL=unsloth,unsloth_head,node,hf,hf_head  (x2, 523 s)
#     LANES="0:test_packed 1:tp_phi16,test_gpu_dir" PACKED_K=step_matches_unpacked T_TEST=555     (x2, 580 s)
#
# Stages:
#   tp_<case>      benchmarks/train_throughput.py --share-process --impl $TP_IMPL (default
#                  unsloth,node,hf: the node and the raw Unsloth loop share one process, the plain
#                  transformers loop gets its own) for one case: Unsloth compiles each decoder block on
#                  the first step of a new shape family (29-87 s seen), which is why cases are spread
#                  over lanes;
#   epoch          benchmarks/epoch_real_lengths.py: one epoch of FunctionGemma-270M on the real length
#                  distribution (the pipeline's rendering, with distractor tools), reference recipe vs
#                  padding-free packing; epoch_own: the sample's own tools only; epoch_ext: Gemma-3-1B on
#                  the extractor's lengths;
#   probe          benchmarks/probe_classifier_memory.py on Phi-4-mini, 16-bit and 4-bit;
#   test_train     pytest -m gpu tests/test_training_gpu.py (unsloth + hf backends, 4-bit, packing);
#   test_packed    only its packing tests (packed == unpacked on the unsloth backend, the packed node;
#                  PACKED_K narrows pytest's -k, default "packed");
#   test_pipeline  pytest -m gpu tests/gpu/test_pipeline_gpu.py (the whole tiny pipeline on the GPU);
#   test_gpu_dir   the rest of tests/gpu (the GPU site, the benchmark harness).
# Lanes share the host's CPUs: compile phases overlap, and absolute tokens/s moved between calls (all
# implementations of one run alike), so compare implementations within one run.
set -uo pipefail
OUT=${OUT:-$PWD/benchmarks/results/gpu_suite}
mkdir -p "$OUT" "$OUT/logs"
source scripts/gpu_unpack.sh
LANES=${LANES:-"0:test_pipeline 1:test_train,epoch_own 2:probe,test_gpu_dir 3:epoch_ext"}
TP_IMPL=${TP_IMPL:-unsloth,node,hf} T_TP=${T_TP:-300} T_EPOCH=${T_EPOCH:-330} T_TEST=${T_TEST:-240} T_PIPE=${T_PIPE:-540}
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
    timeout "$T_TP" python3 benchmarks/train_throughput.py --share-process --impl "$TP_IMPL" \
      --preset table --keys "${TP_KEYS[$k]}" --model-root "$models" --tokenizer-cache .bench_tokenizers \
      --deadline-s $((T_TP - 10)) --out "$OUT/tp_$k.json" --log "$OUT/logs/tp_$k.log" \
      >"$OUT/logs/tp_${k}_driver.log" 2>&1
    grep -aE "^\S+\|.*(ok|timeout|error|oom)" "$OUT/logs/tp_${k}_driver.log" | tail -6 | tee -a "$OUT/suite.log"
    ;;
  epoch | epoch_own | epoch_ext)
    local m=functiongemma-270m d=function_calling/with_distractors
    [ "$s" = epoch_own ] && d=function_calling/own_tools
    [ "$s" = epoch_ext ] && m=gemma-3-1b && d=extractor
    stamp "epoch on real lengths $m $d (limit ${T_EPOCH}s)"
    timeout "$T_EPOCH" python3 benchmarks/epoch_real_lengths.py --model $m --distribution $d \
      --model-root "$models" --tokenizer-cache .bench_tokenizers --out "$OUT/$s.json" >"$OUT/logs/$s.log" 2>&1
    grep -aE "^(==|reference|packed|wrote)|Error" "$OUT/logs/$s.log" | tail -8 | tee -a "$OUT/suite.log"
    ;;
  probe)
    stamp "classifier memory probe (limit ${T_TP}s)"
    [ -f "$models/phi-4-mini/config.json" ] || python3 benchmarks/train_throughput.py --_build phi-4-mini \
      "$models/phi-4-mini" --device cuda --tokenizer-cache .bench_tokenizers >"$OUT/logs/probe_build.log" 2>&1
    for q in 16 4; do
      timeout "$T_TP" python3 benchmarks/probe_classifier_memory.py --model-dir "$models/phi-4-mini" \
        $([ $q = 4 ] && echo --load-in-4bit) --out "$OUT/probe_phi$q.json" >"$OUT/logs/probe_phi$q.log" 2>&1
      grep -a '^{' "$OUT/logs/probe_phi$q.log" | tee -a "$OUT/suite.log"
    done
    ;;
  test_train | test_train_tail | test_packed | test_pipeline | test_gpu_dir)
    local what=tests/test_training_gpu.py lim=$T_TEST
    [ "$s" = test_pipeline ] && what=tests/gpu/test_pipeline_gpu.py && lim=$T_PIPE
    [ "$s" = test_gpu_dir ] && what="tests/gpu --deselect tests/gpu/test_pipeline_gpu.py" && lim=$T_TEST
    [ "$s" = test_packed ] && what="tests/test_training_gpu.py -k ${PACKED_K:-packed}"
    [ "$s" = test_train_tail ] && what="tests/test_training_gpu.py::test_unsloth_4bit_lora_only_updates tests/test_training_gpu.py::test_unsloth_packed_sft_uses_varlen_attention"
    stamp "pytest $what (limit ${lim}s)"
    # SIGINT, not TERM: pytest then still prints the failures it has.
    DAGTUNE_GPU_TEST_LOGS=$OUT/logs timeout -s INT -k 15 "$lim" python3 -m pytest -m gpu -q -p no:cacheprovider -rs -s --tb=short \
      $what >"$OUT/logs/$s.log" 2>&1
    grep -avE "it/s\]|s/it\]" "$OUT/logs/$s.log" | grep -aE "passed|failed|error|FAILED|ERROR|^E |^\{|PACKED_VS|packed attention calls" |
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
