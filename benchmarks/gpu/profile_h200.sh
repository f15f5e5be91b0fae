#!/usr/bin/env bash
# Profile Llama-3.1-8B and Qwen2.5-14B (Llama architecture, published sizes) with vLLM 0.26.0 at TP 1, 2 and 4
# on one 4×H200 machine; the committed profiles in models/data/profiles/h200-vllm0.26/ come from this script.
#
# Engines run as separate processes (setsid, each killed with its process group once it wrote its results),
# in parallel where GPUs allow: llama TP1 on GPU0, qwen TP1 on GPU1, llama TP2 on GPUs 2,3; then qwen TP2;
# then TP4 of each (nitsum_runtime/profile_launch.py). Parts are written row by row under $PARTS and packed
# into OUT/parts.tgz after each engine, so a run cut off by a time limit keeps what it measured.
#
# Needs: vLLM 0.26.0 importable (benchmarks/gpu/install_vllm.sh) and this project installed (`nitsum` on PATH).
# Usage: benchmarks/gpu/profile_h200.sh OUT [DEADLINE_S=420] [MODELS] [TPS] [BUDGETS=1=90,2=60,4=45]
# Writes (8 files at most): OUT/launch.log, OUT/parts.tgz, OUT/profiles/<model>.{csv.gz,meta.json,details.json}
set -uo pipefail
out=${1:?usage: profile_h200.sh OUT [DEADLINE_S] [MODELS] [TPS] [BUDGETS]}
deadline=${2:-420}
models=${3:-llama-3.1-8b,qwen2.5-14b}
tps=${4:-1,2,4}
budgets=${5:-1=90,2=60,4=45}
passes=${PASSES:-1}  # PASSES=N: each engine measures the whole grid N times (repeats spread in time)
parts=${PARTS:-/tmp/nitsum-parts}
# NVLink multicast stays off in NCCL, PyTorch and NVSHMEM, here and in every child process.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out" "$parts"
out=$(cd "$out" && pwd)
cd "$parts"  # not a source checkout: `python -m` would import the uninstalled tree
{
  date -u +"start %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
  nitsum profile --model "$models" --tp "$tps" --gpus 0,1,2,3 --parts "$parts" --pack "$out/parts.tgz" \
    --out "$out/profiles" --deadline-s "$deadline" --budget-s "$budgets" --passes "$passes"
  echo "nitsum profile exit $?"
  date -u +"end %Y-%m-%dT%H:%M:%SZ"
} 2>&1 | tee "$out/launch.log"
