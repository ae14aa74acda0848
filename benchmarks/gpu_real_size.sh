#!/usr/bin/env bash
# Issue 19's GPU call: the real-size nightly DAG (benchmarks/pipeline_real_size.py) and evaluation's
# generation speed (benchmarks/generation_throughput.py) on one GPU, inside one 10-minute device call.
#
#   here:   bash scripts/gpu_carry.sh            (builds .gpu_carry/, as for benchmarks/gpu_suite.sh)
#   device: run(kind="nvidia-h200", carry=[".gpu_carry"], command="timeout 595 bash benchmarks/gpu_real_size.sh")
#
# Stages, in order, each under its own time limit, results written to $OUT as they are produced:
#   build     the three real-shape models, random init (train_throughput.py --_build; ~1-2 min, Phi-4-mini
#             is 7.7 GB of bf16 to write), under $MODELS;
#   gen       generation_throughput.py on FunctionGemma-270M and Gemma-3-1B: $GEN_N prompts batched
#             (batch size by memory) vs the first $GEN_SEQ one at a time (limit $T_GEN s);
#   wait_models  wait for another lane's build (gpu_real_size_x2.sh);
#   seed      the seed recipe (8 x 4 accumulated, checkpointing on) for SEED_STEPS steps per trainer;
#   pipeline  pipeline_real_size.py --cold (or --warm with WARM=1) at the nightly size
#             (FC/EXTRACTOR/CLASSIFIER/EVAL, defaults 4000/8000/4000/512), STEPS_CAP if set; it gets
#             what is left of $BUDGET seconds (SIGINT first, so the JSON of finished runs stays).
#   ddp       the classifier node on 1 then 2 GPUs (hf backend, same global batch; DDP_STEPS steps);
#   llama_cuda  llama.cpp with its CUDA backend (scripts/build_llama_cuda.sh; 4-5 min, every call: the
#             libraries are too large to come back and be carried); on success $LLAMA_LIB (llama-cpp-python's
#             LLAMA_CPP_LIB_PATH, CPU libraries until then) is switched to it, for a convert_gguf that starts
#             later with convert_gguf.parity_llama_gpu on, and for the parity stage;
#   parity    benchmarks/parity_real_size.py: convert_gguf's parity check at real size (FunctionGemma),
#             llama.cpp on the GPU without torch, beside torch, two at once (PARITY_VARIANTS);
#   gpu_tests the GPU tests (pytest -m gpu; GPU_TESTS = the files), under what is left of $BUDGET.
# Knobs (env): STAGES="build gen pipeline" BUDGET=585 T_GEN=120 GEN_N=512 GEN_SEQ=16 STEPS_CAP= WARM=
#   PIPE_LIMIT= (seconds: the pipeline stage's own cap, to leave time for later stages)
#   PIPE_OVERRIDE= (JSON deep-merged into the pipeline stage's config, e.g. {"runtime": {"gpus": 2}})
#   WARM=1: a cold run then a warm one (every node rerun on the warm compile cache); WARM=only: the warm
#   run alone, on the state a previous call left on this machine (kept warm between calls)
#   MPS=1: the lane's processes share their GPU through CUDA MPS (a daemon of this lane's own, so
#   kernels of the concurrent nodes run side by side instead of time-sliced per process)
set -uo pipefail
OUT=${OUT:-$PWD/benchmarks/results/gpu_real_size}
mkdir -p "$OUT"
[ -n "${DAGTUNE_GPU_UNPACKED:-}" ] || source scripts/gpu_unpack.sh  # gpu_real_size_x2.sh unpacks once
MODELS=${MODELS:-${TMPDIR:-/tmp}/dagtune_models_real}
STAGES=${STAGES:-"build gen pipeline"} BUDGET=${BUDGET:-585} T_GEN=${T_GEN:-120}
GEN_N=${GEN_N:-512} GEN_SEQ=${GEN_SEQ:-16}
FC=${FC:-4000} EXTRACTOR=${EXTRACTOR:-8000} CLASSIFIER=${CLASSIFIER:-4000} EVAL=${EVAL:-512}
TOKS=()
[ -d .bench_tokenizers ] && TOKS=(--tokenizer-cache .bench_tokenizers)
t0=$(date +%s)
stamp() { echo "[real_size $(($(date +%s) - t0))s] $*" | tee -a "$OUT/real_size.log"; }
left() { echo $((BUDGET - ($(date +%s) - t0))); }

nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee -a "$OUT/real_size.log"
if [ -n "${MPS:-}" ]; then
  # The daemon sees every GPU (clients keep their physical CUDA_VISIBLE_DEVICES); only this lane's
  # processes find it, through its own pipe directory.
  export CUDA_MPS_PIPE_DIRECTORY=${TMPDIR:-/tmp}/dagtune_mps_${LANE:-0}/pipe CUDA_MPS_LOG_DIRECTORY=$OUT/mps_log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if env -u CUDA_VISIBLE_DEVICES nvidia-cuda-mps-control -d; then
    stamp "CUDA MPS daemon started"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    stamp "CUDA MPS unavailable: this lane runs without it"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi
for s in $STAGES; do
  case $s in
  build)
    # The three at once (each is one process writing its own directory): ~30 s instead of ~80.
    for m in functiongemma-270m gemma-3-1b phi-4-mini; do
      [ -f "$MODELS/$m/config.json" ] && continue
      stamp "build $m"
      ( python3 benchmarks/train_throughput.py --_build $m "$MODELS/$m" --device cuda "${TOKS[@]}" \
          >>"$OUT/build_$m.log" 2>&1 || stamp "build $m FAILED (see build_$m.log)" ) &
    done
    wait
    stamp "models built"
    touch "$MODELS/.built"
    ;;
  wait_models)
    stamp "waiting for the models (built by the other lane)"
    while [ ! -f "$MODELS/.built" ] && [ "$(left)" -gt 60 ]; do sleep 5; done
    ;;
  seed)
    # The seed recipe on the same examples, for the speed-up: micro-batch 8 padded to the longest,
    # gradient accumulation 4 (32 examples per step), gradient checkpointing on; SEED_STEPS steps.
    lim=$(left)
    stamp "seed recipe, ${SEED_STEPS:-30} steps per trainer (limit ${lim}s)"
    seed='{"train_function_calling": {"optim": {"batch_size": 8, "grad_accum": 4}},
           "train_extractor": {"optim": {"batch_size": 8, "grad_accum": 4}, "gradient_checkpointing": true},
           "train_classifier": {"optim": {"batch_size": 8, "grad_accum": 4}}}'
    timeout -s INT -k 60 "$lim" python3 benchmarks/pipeline_real_size.py --device cuda --model-root "$MODELS" \
      --fc "$FC" --extractor "$EXTRACTOR" --classifier "$CLASSIFIER" --eval 16 "${TOKS[@]}" \
      --steps-cap "${SEED_STEPS:-30}" --override "$seed" --state-dir "${TMPDIR:-/tmp}/dagtune_seed_state" \
      --out "$OUT/pipeline_seed_recipe.json" >"$OUT/pipeline_seed_recipe.driver.log" 2>&1
    grep -aE "^(cold|warm):|wrote|Error" "$OUT/pipeline_seed_recipe.driver.log" | tee -a "$OUT/real_size.log"
    ;;
  gen)
    stamp "generation throughput (limit ${T_GEN}s)"
    timeout -s INT -k 10 "$T_GEN" python3 benchmarks/generation_throughput.py --device cuda --n "$GEN_N" \
      --n-sequential "$GEN_SEQ" --model-root "$MODELS" "${TOKS[@]}" --out "$OUT/generation_throughput.json" \
      >"$OUT/generation_throughput.log" 2>&1
    grep -aE "^(functiongemma|gemma3) |Error" "$OUT/generation_throughput.log" | tee -a "$OUT/real_size.log"
    ;;
  llama_cuda)
    dir=${TMPDIR:-/tmp}/dagtune_llama_cuda
    stamp "llama.cpp CUDA build (JOBS=${LLAMA_JOBS:-16})"
    JOBS=${LLAMA_JOBS:-16} bash scripts/build_llama_cuda.sh .gpu_carry/llama_src.tar.xz "$dir" >"$OUT/llama_cuda.log" 2>&1
    tail -3 "$OUT/llama_cuda.log" | tee -a "$OUT/real_size.log"
    if LLAMA_CPP_LIB_PATH=$dir python3 -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" \
      >>"$OUT/llama_cuda.log" 2>&1; then
      ln -sfn "$dir" "$LLAMA_LIB.new" && mv -T "$LLAMA_LIB.new" "$LLAMA_LIB" && stamp "llama.cpp on the GPU from now on"
    else
      stamp "llama.cpp CUDA libraries unusable: parity stays on the CPU (see llama_cuda.log)"
    fi
    ;;
  parity)
    lim=$(($(left) - 10))
    stamp "parity at real size, llama.cpp on the GPU (limit ${lim}s)"
    timeout -s INT -k 10 "$lim" python3 benchmarks/parity_real_size.py --model-root "$MODELS" \
      --variants ${PARITY_VARIANTS:-llama_only gpu gpu2} --out "$OUT/parity_real_size.json" >"$OUT/parity_real_size.log" 2>&1
    grep -aE '^\{"variant' "$OUT/parity_real_size.log" | cut -c1-600 | tee -a "$OUT/real_size.log"
    ;;
  gpu_tests)
    # The GPU tests (pytest -m gpu), most telling first; GPU_TESTS overrides the list.
    lim=$(($(left) - 15))
    tests=${GPU_TESTS:-"tests/gpu/test_pipeline_gpu.py tests/test_training_gpu.py tests/gpu/test_gpu_site.py tests/gpu/test_train_throughput_gpu.py"}
    stamp "gpu tests (limit ${lim}s): $tests"
    timeout -s INT -k 10 "$lim" python3 -m pytest -m gpu -v -p no:cacheprovider --durations=0 $tests \
      >"$OUT/gpu_tests.log" 2>&1
    grep -aE "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -30 | tee -a "$OUT/real_size.log"
    ;;
  ddp)
    # Data parallel inside the classifier node (hf backend, NF4): the same global batch of 32 on 1 and
    # on 2 GPUs, DDP_STEPS steps each, through the flow (--only prepare_data train_classifier).
    for g in 1 2; do
      lim=$(($(left) - 5))
      [ "$lim" -lt 60 ] && { stamp "ddp gpus=$g skipped: ${lim}s left"; continue; }
      stamp "ddp classifier gpus=$g (limit ${lim}s)"
      timeout -s INT -k 30 "$lim" python3 benchmarks/pipeline_real_size.py --device cuda --model-root "$MODELS" \
        --fc 64 --extractor 64 --classifier "$CLASSIFIER" --eval 16 "${TOKS[@]}" --steps-cap "${DDP_STEPS:-40}" \
        --only prepare_data train_classifier \
        --override "{\"runtime\": {\"backend\": \"hf\"}, \"train_classifier\": {\"gpus\": $g}}" \
        --state-dir "${TMPDIR:-/tmp}/dagtune_ddp_state_$g" --out "$OUT/ddp_classifier_gpus$g.json" \
        >"$OUT/ddp_classifier_gpus$g.driver.log" 2>&1
      grep -aE "^(cold|warm):|wrote|Error" "$OUT/ddp_classifier_gpus$g.driver.log" | tee -a "$OUT/real_size.log"
    done
    ;;
  pipeline)
    lim=$(left)
    [ -n "${PIPE_LIMIT:-}" ] && [ "$PIPE_LIMIT" -lt "$lim" ] && lim=$PIPE_LIMIT
    stamp "pipeline real size ${FC}/${EXTRACTOR}/${CLASSIFIER}/${EVAL} (limit ${lim}s)"
    timeout -s INT -k 60 "$lim" python3 benchmarks/pipeline_real_size.py --device cuda --model-root "$MODELS" \
      --fc "$FC" --extractor "$EXTRACTOR" --classifier "$CLASSIFIER" --eval "$EVAL" "${TOKS[@]}" \
      ${STEPS_CAP:+--steps-cap "$STEPS_CAP"} $(case ${WARM:-} in only) echo --warm-only ;; ?*) echo --warm ;; esac) \
      ${PIPE_OVERRIDE:+--override "$PIPE_OVERRIDE"} \
      --state-dir "${TMPDIR:-/tmp}/dagtune_real_state_${LANE:-0}" --out "$OUT/pipeline_real_size.json" \
      >"$OUT/pipeline_real_size.driver.log" 2>&1
    grep -aE "^(cold|warm):|wrote|Error" "$OUT/pipeline_real_size.driver.log" | tee -a "$OUT/real_size.log"
    ;;
  esac
done
stamp "done"
