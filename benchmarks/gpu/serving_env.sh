# Sourced by the serving-path GPU scripts (run_fidelity, run_serving, run_adaptive; needs ROOT, the checkout):
# NVLink multicast off (NCCL NVLS, symmetric memory, NVSHMEM), vLLM offline and quiet with its default kernels (no
# batch invariance, as in the profiles the latency model was fitted on; no expandable segments, which break sleep
# mode), then this tree on PYTHONPATH (tree_pythonpath.sh) and the working directory in it.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
unset PYTORCH_CUDA_ALLOC_CONF VLLM_BATCH_INVARIANT
. "$ROOT/benchmarks/gpu/tree_pythonpath.sh"
cd "$PP" || exit 2
