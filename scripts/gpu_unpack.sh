# Source this on the GPU machine (device tool, carry [".gpu_carry"]) to unpack what
# scripts/gpu_carry.sh packed and put it on the paths: afterwards `python3 -m dagtune.cli run`,
# the GPU tests and the benchmarks run there as here.
_gc=${DAGTUNE_GPU_UNPACK:-/tmp/dagtune_gpu}
mkdir -p "$_gc"
for _t in .gpu_carry/site.tar.xz .gpu_carry/llama.tar.xz; do tar -C "$_gc" -xJf "$_t"; done
[ -f .gpu_carry/tok.tar.xz ] && tar -xJf .gpu_carry/tok.tar.xz
export PYTHONPATH="$_gc/site:$_gc/llama/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DAGTUNE_LLAMA_CPP_TOOLS="$_gc/llama/llama_cpp_tools"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1
