#!/usr/bin/env bash
# The simulator check on one H200: replay the committed trace slices on a vLLM 0.26.0 engine (Llama-3.1-8B
# architecture, dummy weights, TP 1, the default scenario's engine settings) and write what each request took.
#
#   OUT=/path [MODEL=llama-3.1-8b] [TP=1] [LOG_STEPS=1] [GPU_MEM=0.9] [ONLY=slice,...] bash benchmarks/gpu/run_fidelity_h200.sh \
#       [SLICES=benchmarks/gpu/fidelity/slices.csv] [DEADLINE_S=520]
#
# The engine runs on GPUs 0..TP-1 (a model preset of nitsum_opt.models.spec).
# Needs vLLM importable (benchmarks/gpu/install_vllm.sh into /tmp/site). Writes OUT/measured.csv, OUT/meta.json
# and OUT/run_fidelity_h200.log; compare on any machine with
#   python benchmarks/sim/fidelity.py compare --measured OUT
# vLLM's default kernels (no batch invariance), as in the profiles the latency model was fitted on.
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
slices=$(realpath "${1:-$ROOT/benchmarks/gpu/fidelity/slices.csv}")
deadline=${2:-520}
mkdir -p "$OUT"
. "$ROOT/benchmarks/gpu/serving_env.sh"  # multicast off, vLLM defaults, this tree imported from $PP
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$OUT/run_fidelity_h200.log"
model=${MODEL:-llama-3.1-8b}
tp=${TP:-1}
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((tp - 1)))} timeout -k 15 $((deadline + 60)) setsid python3 -m nitsum_runtime.bench_fidelity \
  --slices "$slices" --out "$OUT" --deadline-s "$deadline" --model "$model" --tp "$tp" ${LOG_STEPS:+--log-steps} \
  ${GPU_MEM:+--gpu-memory-utilization "$GPU_MEM"} ${ONLY:+--only "$ONLY"} \
  --command "MODEL=$model TP=$tp${LOG_STEPS:+ LOG_STEPS=1}${GPU_MEM:+ GPU_MEM=$GPU_MEM}${ONLY:+ ONLY=$ONLY} bash benchmarks/gpu/run_fidelity_h200.sh ${1:-} ${2:-}" 2>&1 | tee -a "$OUT/run_fidelity_h200.log"
rc=${PIPESTATUS[0]}
echo "exit $rc" | tee -a "$OUT/run_fidelity_h200.log"
exit "$rc"
