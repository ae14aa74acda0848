#!/usr/bin/env bash
# Issue 19's GPU call on two GPUs (nvidia-h200-x2), two lanes of gpu_real_size.sh side by side:
#   GPU 0: build the real-shape models, then the whole nightly DAG at the real recipe (the table);
#   GPU 1: generation throughput, then the seed recipe on the same examples (the training speed-up).
# LANE0 / LANE1 replace the stages of a lane (gpu_real_size.sh), e.g. LANE1="gpu_tests"; MPS0 / MPS1 its MPS.
#   device: run(kind="nvidia-h200-x2", carry=[".gpu_carry"], command="timeout 595 bash benchmarks/gpu_real_size_x2.sh")
# What comes back ($OUT, at most 8 files): the JSON and markdown of each benchmark and logs.tgz.
set -uo pipefail
FINAL=${OUT:-$PWD/benchmarks/results/gpu_real_size}
mkdir -p "$FINAL"
source scripts/gpu_unpack.sh
export DAGTUNE_GPU_UNPACKED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# llama-cpp-python's libraries, switched by the llama_cuda stage from the CPU build to the CUDA one.
export LLAMA_LIB=${TMPDIR:-/tmp}/dagtune_llama_lib
ln -sfn "$(python3 -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')/lib" "$LLAMA_LIB"
export LLAMA_CPP_LIB_PATH=$LLAMA_LIB
L=${TMPDIR:-/tmp}/dagtune_lanes
rm -rf "$L"; mkdir -p "$L/0" "$L/1"
BUDGET=${BUDGET:-530}
# SPLIT_CPUS=1: each lane on half the host's CPUs (16 of 32: what the one-GPU nvidia-h200 machine has),
# so two lanes running DAGs side by side do not share llama.cpp's and the trainers' CPU threads.
n=$(nproc); c0=""; c1=""
[ -n "${SPLIT_CPUS:-}" ] && c0="taskset -c 0-$((n / 2 - 1))" && c1="taskset -c $((n / 2))-$((n - 1))"
LANE=0 CUDA_VISIBLE_DEVICES=0 OUT=$L/0 STAGES=${LANE0:-"build pipeline"} BUDGET=$BUDGET MPS=${MPS0:-} $c0 bash benchmarks/gpu_real_size.sh &
LANE=1 CUDA_VISIBLE_DEVICES=1 OUT=$L/1 STAGES=${LANE1:-"wait_models gen seed"} BUDGET=$BUDGET MPS=${MPS1:-} $c1 bash benchmarks/gpu_real_size.sh &
wait
for f in 0/pipeline_real_size.json 0/pipeline_real_size.md 1/generation_throughput.json \
  1/pipeline_seed_recipe.json 1/gpu_tests.log 1/parity_real_size.json; do
  [ -f "$L/$f" ] && cp "$L/$f" "$FINAL/"
done
# lane 1's own DAG run (LANE1 with pipeline), under another name
for x in json md; do [ -f "$L/1/pipeline_real_size.$x" ] && cp "$L/1/pipeline_real_size.$x" "$FINAL/pipeline_real_size_lane1.$x"; done
tar -C "$L" -czf "$FINAL/logs.tgz" --exclude='*.state' --exclude='*.tar.xz' 0 1
cat "$L/0/real_size.log" "$L/1/real_size.log"
