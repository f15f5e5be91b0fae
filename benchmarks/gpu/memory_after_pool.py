"""Diagnostic: what GPU memory a process still holds after a serving run closed its engines (the prefill/decode
deployment of ``benchmarks/gpu/serving/plans.json`` on the first requests of the 8 req/s slice).

    . benchmarks/gpu/serving_env.sh && python3 benchmarks/gpu/memory_after_pool.py ROOT [REQUESTS]

Prints, after the run and again after ``gc.collect()`` + ``torch.cuda.empty_cache()``: the compute processes
``nvidia-smi`` lists, PyTorch's reserved memory per GPU in this process, and the free memory per GPU."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def show(tag: str) -> None:
    import torch

    apps = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    print(tag, "pid", os.getpid(), "nvidia-smi apps:", apps.replace("\n", " | ") or "none", flush=True)
    gpus = range(torch.cuda.device_count())
    if torch.cuda.is_initialized():
        print(tag, "torch reserved GiB", [round(torch.cuda.memory_reserved(g) / 2**30, 1) for g in gpus], flush=True)
    print(tag, "free GiB", [round(torch.cuda.mem_get_info(g)[0] / 2**30, 1) for g in gpus], flush=True)


def main() -> None:
    root = Path(sys.argv[1])
    requests = sys.argv[2] if len(sys.argv) > 2 else "60"
    from nitsum_runtime.bench_serving import parse_args, run

    args = ["--plans", str(root / "benchmarks/gpu/serving/plans.json")]
    args += ["--slices", str(root / "benchmarks/gpu/fidelity/slices.csv"), "--out", tempfile.mkdtemp()]
    args += ["--only", "pd", "--limit", requests, "--drain-s", "10"]
    print("run rc", run(parse_args(args)), flush=True)
    show("after run")
    gc.collect()
    import torch

    torch.cuda.empty_cache()
    show("after gc + empty_cache")


if __name__ == "__main__":
    main()
