#!/usr/bin/env bash
# Runtime checks and benchmarks on a 4x H200 machine (issue 5). Writes CSV/JSON/PNG + markdown under $OUT.
#
#   bash benchmarks/gpu/run_runtime_h200.sh core    # GPU tests (no vLLM) + (a) KV bandwidth + (b) reference switch
#   bash benchmarks/gpu/run_runtime_h200.sh vllm    # (c) vLLM engines switching TP (needs vLLM in /tmp/site)
#   bash benchmarks/gpu/run_runtime_h200.sh rerun   # (b) then (c), one command of < 7 min (about 4.5 expected):
#                                                   # switch <= 90 s, vllm <= 300 s, compact summary at the end
#   bash benchmarks/gpu/run_runtime_h200.sh pool    # (d) the transition executor on vLLM engines: TP1->TP2->TP4->TP1
#   bash benchmarks/gpu/run_runtime_h200.sh pool-kv # (d) with the KV of in-flight requests migrated (KV connector)
#                                                   # (TP1->TP2->TP1 with --world 2) + 100 switches, ~5.5 min on
#                                                   # 4 GPUs, ~3.5 on 2 (needs vLLM in /tmp/site; <= 560 s)
#   bash benchmarks/gpu/run_runtime_h200.sh vllm-test|pool-test|kv|switch|tests   # single steps
#   VLLM_BATCH_INVARIANT=0 NITSUM_MIN_GPUS=2 bash benchmarks/gpu/run_runtime_h200.sh adaptive-test
#                                                   # the control loop's GPU test (tests/runtime/test_gpu_adaptive.py,
#                                                   # ~6 min; needs vLLM and OR-Tools in /tmp/site)
#   NITSUM_MIN_GPUS=2 bash benchmarks/gpu/run_runtime_h200.sh all-tests
#                                                   # every gpu-marked test file, each in a pytest process of its
#                                                   # own (~17 min on 2 GPUs, so more than one device call's 10 min:
#                                                   # NITSUM_GPU_TEST_FILES="a.py b.py" picks files): a process that
#                                                   # ran vLLM engines with resident weights keeps GPU memory, which
#                                                   # the profiler test, needing 0.9 of a GPU, then lacks
#
# CPU dry run of the same steps (what CI-like checks use): NITSUM_MIN_GPUS=0
#   NITSUM_BENCH_ARGS="--model tiny --backend gloo --world 2 --quick --dtype float32 --tolerance 1e-3"
#   (part pool: add "--engines toy --switches 10" to run it on the CPU stand-in for vLLM)
#
# Each step runs in its own session (setsid) under a timeout: at the limit the benchmark gets SIGTERM, closes
# its engines and writes its partial report (SIGKILL 15 s later); rank and engine processes lead their own
# sessions and exit when their parent dies. Exit status: 0 all passed, 1 a check failed, 2 could not run.
set -uo pipefail
part=${1:-core}
OUT=${OUT:?set OUT to the results folder}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# vLLM's batch-invariant kernels make a request's output independent of what else is in the batch; without them
# two identical TP1 runs already differ (measured: control run differs by 0.03 nats), so the bit-identity check of
# the round trip is only meaningful with them. Set VLLM_BATCH_INVARIANT=0 to time the default kernels instead.
export VLLM_BATCH_INVARIANT=${VLLM_BATCH_INVARIANT:-1}
export CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONUNBUFFERED=1
unset PYTORCH_CUDA_ALLOC_CONF  # expandable segments break vLLM sleep mode

# Import this tree without installing it (sets PP, removed at exit).
. "$ROOT/benchmarks/gpu/tree_pythonpath.sh"
cd "$PP" || exit 2   # never run from $ROOT: ./nitsum_opt there lacks the models mapping

log="$OUT/run_runtime_h200.log"
say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$log"; }
say "part=$part root=$ROOT out=$OUT"
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv 2>&1 | tee -a "$log"
if ! python3 - >>"$log" 2>&1 <<'PY'
import sys, torch, pydantic, nitsum_runtime.gpu_bench  # noqa: F401
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpus", torch.cuda.device_count(), "pydantic", pydantic.__version__)
import os
if torch.cuda.device_count() < int(os.environ.get("NITSUM_MIN_GPUS", "4")):
    sys.exit("need 4 GPUs for the runtime benchmarks")
PY
then
  tail -5 "$log"; say "FATAL: python environment check failed (torch, pydantic, 4 GPUs, this tree importable)"; exit 2
fi
tail -1 "$log"

status=0
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  say "== $name (timeout ${t}s): $*"
  local start=$SECONDS
  timeout -k 15 "$t" setsid -w "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  say "== $name rc=$rc in $((SECONDS - start)) s"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "!! $name timed out"; rc=2; fi
  [ "$rc" -gt "$status" ] && status=$rc
  return 0
}
pytest_gpu() {  # pytest_gpu NAME TIMEOUT -k EXPR [TEST FILE under tests/runtime]
  step "$1" "$2" python3 -m pytest -q -s -p no:cacheprovider -c "$ROOT/pyproject.toml" --rootdir "$ROOT" \
    -o addopts="--import-mode=importlib" -m gpu "$ROOT/tests/runtime/${4:-test_gpu_runtime.py}" -k "$3" \
    --junitxml "$OUT/$1.xml"
}
have_vllm() { python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"; }
case $part in
  tests)  pytest_gpu gpu_tests 240 "not vllm" ;;
  kv)     step kv 240 python3 -m nitsum_runtime.gpu_bench kv --out "$OUT" ${NITSUM_BENCH_ARGS:-} ;;
  switch) step switch 400 python3 -m nitsum_runtime.gpu_bench switch --out "$OUT" ${NITSUM_BENCH_ARGS:-} ;;
  core)
    pytest_gpu gpu_tests 150 "not vllm"
    step kv 150 python3 -m nitsum_runtime.gpu_bench kv --out "$OUT" ${NITSUM_BENCH_ARGS:-}
    step switch 270 python3 -m nitsum_runtime.gpu_bench switch --out "$OUT" ${NITSUM_BENCH_ARGS:-} ;;
  rerun)
    step switch 90 python3 -m nitsum_runtime.gpu_bench switch --out "$OUT" ${NITSUM_BENCH_ARGS:-}
    if have_vllm; then
      step vllm 300 python3 -m nitsum_runtime.gpu_bench vllm --out "$OUT" ${NITSUM_BENCH_ARGS:-}
    else
      say "!! vLLM not found (install the bundles into /tmp/site): (c) skipped"; status=2
    fi ;;
  pool-kv|pool-kv-test)  # (d) with in-flight requests' KV migrated into vLLM engines (Nitsum KV connector)
    have_vllm || { say "FATAL: vLLM not found; install the bundles into /tmp/site"; exit 2; }
    if [ "$part" = pool-kv-test ]; then pytest_gpu gpu_pool_kv_test 560 "migrates_kv" test_gpu_vllm_pool.py
    else step pool-kv 560 python3 -m nitsum_runtime.gpu_bench pool --kv migrate --switches "${NITSUM_KV_SWITCHES:-60}" \
      --out "$OUT" ${NITSUM_BENCH_ARGS:-}; fi ;;
  pool|pool-test)
    case " ${NITSUM_BENCH_ARGS:-} " in
      *" --engines toy "*) ;;  # CPU dry run on the toy engines: no vLLM needed
      *) have_vllm || { say "FATAL: vLLM not found; install the bundles into /tmp/site"; exit 2; } ;;
    esac
    if [ "$part" = pool-test ]; then pytest_gpu gpu_pool_test 560 "100_switches" test_gpu_vllm_pool.py
    else step pool 560 python3 -m nitsum_runtime.gpu_bench pool --out "$OUT" ${NITSUM_BENCH_ARGS:-}; fi ;;
  all-tests)
    files=${NITSUM_GPU_TEST_FILES:-"test_gpu_runtime.py test_gpu_vllm_pool.py test_gpu_serving.py test_gpu_adaptive.py test_profiler_gpu.py"}
    for f in $files; do pytest_gpu "gpu_${f%.py}" 590 "" "$f"; done ;;
  adaptive-test)
    have_vllm || { say "FATAL: vLLM not found; install the bundles into /tmp/site"; exit 2; }
    pytest_gpu gpu_adaptive_test 560 "switches_tp" test_gpu_adaptive.py ;;
  vllm|vllm-test)
    have_vllm || { say "FATAL: vLLM not found; install the bundles into /tmp/site"; exit 2; }
    if [ "$part" = vllm-test ]; then pytest_gpu gpu_vllm_test 240 "vllm"
    else step vllm 540 python3 -m nitsum_runtime.gpu_bench vllm --out "$OUT" ${NITSUM_BENCH_ARGS:-}; fi ;;
  *) say "unknown part $part (core|vllm|pool|pool-kv|pool-kv-test|rerun|vllm-test|pool-test|adaptive-test|all-tests|tests|kv|switch)"; exit 2 ;;
esac
nvidia-smi --query-gpu=index,memory.used --format=csv 2>&1 | tee -a "$log"
{ echo "# Runtime on H200 ($part), status $status"; echo; for f in "$OUT"/*/report.md; do [ -f "$f" ] && cat "$f" && echo; done; } > "$OUT/REPORT_$part.md"
say "done: status=$status; report $OUT/REPORT_$part.md"
echo "== summary" | tee -a "$log"
python3 -m nitsum_runtime.gpu_bench summary --out "$OUT" 2>&1 | tee -a "$log"
exit $status
