"""KV-cache capacity of one engine, when the profile's metadata does not say (documented fallback).

vLLM sizes its KV cache as ``gpu_memory_utilization · total_memory − weights − peak activations − non-torch
memory`` per GPU, then divides by the bytes one token's KV occupies on that GPU. The measured value
(``kv_cache_tokens`` in the profile's meta file) is always preferred; this estimate reproduces vLLM's formula
with a fixed activation + CUDA-graph + NCCL reserve and is good to roughly ±10 %.
"""

from __future__ import annotations

from .features import ArchitectureConstants
from .spec import ModelSpec

GIB = 1024**3

#: Usable HBM per GPU as torch reports it (``torch.cuda.mem_get_info()[1]``), GiB.
GPU_MEMORY_GIB: dict[str, float] = {
    "H100": 79.6,
    "H200": 140.4,
    "A100": 79.2,
}


def gpu_memory_gib(gpu_name: str) -> float:
    """Memory of a GPU from its name (e.g. ``NVIDIA H200``); the error lists the known names."""
    for key, gib in GPU_MEMORY_GIB.items():
        if key.lower() in gpu_name.lower():
            return gib
    raise KeyError(
        f"unknown GPU {gpu_name!r}: no memory size on file (known: {sorted(GPU_MEMORY_GIB)}); "
        "record kv_cache_tokens in the profile meta instead"
    )


def estimate_kv_cache_tokens(
    spec: ModelSpec,
    tp: int,
    gpu_memory_gib_per_gpu: float,
    gpu_memory_utilization: float = 0.9,
    reserve_gib: float = 3.0,
) -> int:
    """Estimated KV capacity (tokens) of one engine of TP ``tp``.

    ``reserve_gib`` covers, per GPU, the peak activations of the profiling forward pass, CUDA graphs and NCCL
    buffers (vLLM measures them; 2–4 GiB for 8–14B models at 8k batched tokens).
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} must be in (0, 1]")
    consts = ArchitectureConstants.from_spec(spec)
    free_bytes = gpu_memory_gib_per_gpu * GIB * gpu_memory_utilization - spec.weight_bytes / tp - reserve_gib * GIB
    per_token = float(consts.kv_bytes_per_token_per_gpu(tp))
    if free_bytes <= per_token:
        raise ValueError(
            f"{spec.name} at tp={tp} does not fit: {spec.weight_bytes / tp / GIB:.1f} GiB of weights per GPU "
            f"leave no KV cache in {gpu_memory_gib_per_gpu} GiB × {gpu_memory_utilization}; use a larger TP"
        )
    return int(free_bytes // per_token)
