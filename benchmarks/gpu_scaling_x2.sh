#!/usr/bin/env bash
# Issue 17's GPU call on two GPUs (nvidia-h200-x2): the whole nightly DAG with both GPUs as slots
# (runtime.gpus 2; compare with gpu_real_size_x2.sh's lane on one GPU), then data parallel inside the
# classifier node on 1 and 2 GPUs (gpu_real_size.sh's ddp stage).
#   device: run(kind="nvidia-h200-x2", carry=[".gpu_carry"], command="timeout 575 bash benchmarks/gpu_scaling_x2.sh")
set -uo pipefail
FINAL=${OUT:-$PWD/benchmarks/results/gpu_scaling}
mkdir -p "$FINAL"
L=${TMPDIR:-/tmp}/dagtune_scaling
rm -rf "$L"; mkdir -p "$L"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Its own state directory (LANE), so its compile caches are cold like a one-GPU lane's first run; CPUS
# (e.g. 0-15) keeps it on the CPUs a one-GPU lane had (gpu_real_size_x2.sh SPLIT_CPUS=1): only the GPU
# count differs.
LANE=${LANE:-two_gpus} CUDA_VISIBLE_DEVICES=0,1 OUT=$L STAGES=${STAGES:-"build pipeline ddp"} BUDGET=${BUDGET:-540} \
  PIPE_LIMIT=${PIPE_LIMIT:-420} PIPE_OVERRIDE='{"runtime": {"gpus": 2}}' ${CPUS:+taskset -c "$CPUS"} \
  bash benchmarks/gpu_real_size.sh
for f in pipeline_real_size.json pipeline_real_size.md ddp_classifier_gpus1.json ddp_classifier_gpus2.json; do
  [ -f "$L/$f" ] && cp "$L/$f" "$FINAL/"
done
tar -C "$L" -czf "$FINAL/logs.tgz" --exclude='*.state' --exclude='dagtune_*' .
cat "$L/real_size.log"
