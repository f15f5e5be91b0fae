#!/usr/bin/env bash
# The runtime serving deployments on vLLM: every run of a plans file (benchmarks/sim/serving_fidelity.py plans)
# through nitsum_runtime.serving on one vLLM 0.26.0 engine per GPU group (Llama-3.1-8B architecture, dummy weights
# refilled from a resident copy, the Nitsum KV connector on for prefill -> decode hand-offs).
#
#   OUT=/path [ONLY=deployment,...] [DRAIN_S=30] bash benchmarks/gpu/run_serving_h200.sh \
#       [PLANS=benchmarks/gpu/serving/plans.json] [SLICES=benchmarks/gpu/fidelity/slices.csv] [DEADLINE_S=480]
#
# Needs vLLM importable (benchmarks/gpu/install_vllm.sh into /tmp/site) and the GPUs the plans use (2 for the
# committed plans). Writes OUT/<deployment>/measured.csv, OUT/meta.json and OUT/run_serving_h200.log; compare on any
# machine with  python benchmarks/sim/serving_fidelity.py compare --measured OUT
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
plans=$(realpath "${1:-$ROOT/benchmarks/gpu/serving/plans.json}")
slices=$(realpath "${2:-$ROOT/benchmarks/gpu/fidelity/slices.csv}")
deadline=${3:-480}
mkdir -p "$OUT"
. "$ROOT/benchmarks/gpu/serving_env.sh"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/run_serving_h200.log"
timeout -k 15 $((deadline + 60)) setsid python3 -m nitsum_runtime.bench_serving \
  --plans "$plans" --slices "$slices" --out "$OUT" --deadline-s "$deadline" --drain-s "${DRAIN_S:-30}" \
  ${ONLY:+--only "$ONLY"} \
  --command "${ONLY:+ONLY=$ONLY }DRAIN_S=${DRAIN_S:-30} bash benchmarks/gpu/run_serving_h200.sh ${1:-} ${2:-} ${3:-}" 2>&1 | tee -a "$OUT/run_serving_h200.log"
rc=${PIPESTATUS[0]}
echo "exit $rc" | tee -a "$OUT/run_serving_h200.log"
exit "$rc"
