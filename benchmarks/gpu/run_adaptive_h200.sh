#!/usr/bin/env bash
# The runtime's control loop on vLLM: one trace slice served while systems decide at runtime (nitsum re-planning
# every epoch, TP switches with KV migration; static baselines for comparison), through
# nitsum_runtime.bench_adaptive on one vLLM 0.26.0 engine per candidate TP group of 2 GPUs (Llama-3.1-8B
# architecture, dummy weights refilled from a resident copy, the Nitsum KV connector on).
#
#   OUT=/path [SYSTEMS=nitsum,vllm-static-tp1] [DEADLINE_S=540] [NO_KV_CONNECTOR=1] bash benchmarks/gpu/run_adaptive_h200.sh \
#       [SCENARIO=examples/scenarios/llama8b-tight.yaml] [SLICES=benchmarks/gpu/adaptive/slices.csv] [SLICE=mean-12rps]
#
# Needs vLLM and OR-Tools importable (benchmarks/gpu/install_vllm.sh into /tmp/site; ortools wheels there too) and
# 2 GPUs. Writes OUT/<system>/measured.csv, OUT/meta.json and OUT/run_adaptive_h200.log; compare on any machine
# with  python benchmarks/sim/adaptive_fidelity.py compare --measured OUT
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
scenario=$(realpath "${1:-$ROOT/examples/scenarios/llama8b-tight.yaml}")
slices=$(realpath "${2:-$ROOT/benchmarks/gpu/adaptive/slices.csv}")
slice=${3:-mean-12rps}
deadline=${DEADLINE_S:-540}
mkdir -p "$OUT"
. "$ROOT/benchmarks/gpu/serving_env.sh"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/run_adaptive_h200.log"
timeout -k 15 $((deadline + 45)) setsid python3 -m nitsum_runtime.bench_adaptive \
  --scenario "$scenario" --slices "$slices" --slice "$slice" --systems "${SYSTEMS:-nitsum,vllm-static-tp1}" \
  --gpus 2 --epoch-s "${EPOCH_S:-15}" --drain-s "${DRAIN_S:-20}" --out "$OUT" --deadline-s "$deadline" \
  ${NO_KV_CONNECTOR:+--no-kv-connector} \
  --command "SYSTEMS=${SYSTEMS:-nitsum,vllm-static-tp1} EPOCH_S=${EPOCH_S:-15} DRAIN_S=${DRAIN_S:-20}${NO_KV_CONNECTOR:+ NO_KV_CONNECTOR=1} DEADLINE_S=$deadline bash benchmarks/gpu/run_adaptive_h200.sh ${1:-} ${2:-} ${3:-}" \
  2>&1 | tee -a "$OUT/run_adaptive_h200.log"
rc=${PIPESTATUS[0]}
echo "exit $rc" | tee -a "$OUT/run_adaptive_h200.log"
exit "$rc"
