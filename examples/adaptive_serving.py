"""Serving while Nitsum re-plans: the runtime's control loop, end to end, on CPU.

Engines: one per candidate TP group of a 2-GPU node (TP 1 on each GPU, TP 2 on both), here toy vLLM engine
processes (the real engine-process code on a CPU model; on GPUs, ``nitsum_runtime.bench_adaptive`` starts vLLM
engines the same way). The controller is the simulator's ``nitsum`` (the MILP every epoch + stabilizer), deciding
from the requests that arrived; every decision is carried out while requests keep flowing (a new scheduler, or a
transition that moves requests between engines). Prints each epoch's decision and the SLO attainment per tier.

Run: python examples/adaptive_serving.py [--seconds 20] [--epoch-s 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from nitsum_opt.sim.fidelity import Timings, slice_control, slo_met
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import make_slices
from nitsum_runtime.adaptive import AdaptiveServer
from nitsum_runtime.bench_serving import tiered_requests
from nitsum_runtime.executor import TransitionExecutor
from nitsum_runtime.toy_vllm import toy_engine_process, write_toy_store
from nitsum_runtime.vllm_pool import VllmPoolSettings, build_vllm_pool, close_pool

SCENARIO = Path(__file__).parent / "scenarios" / "llama8b-tight.yaml"


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the served window")
    ap.add_argument("--epoch-s", type=float, default=5.0, help="seconds between re-plans")
    args = ap.parse_args(argv)

    scenario = Scenario.load(SCENARIO)
    # the bundled workload at 4 req/s from minute 11:40 of the trace (interactive, code and a background class)
    piece = make_slices(scenario.trace(1.0, None), [4.0], args.seconds, start_s=700.0)[0]
    ctx, controller, trace = slice_control(scenario, piece, "nitsum", num_gpus=2, epoch_s=args.epoch_s)
    spec = scenario.model_spec
    with tempfile.TemporaryDirectory() as tmp:
        settings = VllmPoolSettings(
            groups=((0,), (1,), (0, 1)),
            concurrent_starts=True,
            max_model_len=spec.max_model_len,
            extra_llm_kwargs={"num_gpu_blocks_override": 8192},
        )
        store = write_toy_store(Path(tmp) / "store.json", seed=0)
        pool, _ = build_vllm_pool(spec, 2, store, Path(tmp), settings, target=toy_engine_process, log=print)
        try:
            server = AdaptiveServer(pool, controller, ctx, TransitionExecutor(pool, spec))
            start = server.start(trace.window(0.0, args.epoch_s))
            print(f"t=0 s: {start.deployment}")
            result = server.serve(
                tiered_requests(piece), vocab_size=spec.vocab_size, max_model_len=spec.max_model_len,
                duration_s=piece.duration_s, drain_s=30.0,
            )  # fmt: skip
        finally:
            close_pool(pool)
    for e in result.epochs:
        moved = f", moved {e.moved} requests" if e.action == "transition" else ""
        admitted = {k: round(v, 1) for k, v in (e.admitted_rps or {}).items()}
        print(f"t={e.at_s:.0f} s: {e.action}{moved} -> {e.deployment}, admitted req/s {admitted}")
    timings = result.serving.timings
    measured = Timings(
        np.array([t.ttft_s for t in timings]),
        np.array([t.tpot_s for t in timings]),
        np.array([t.finish_s == t.finish_s for t in timings]),
    )
    met = slo_met(piece, measured, scenario.tiers)
    tiers = np.array(piece.tier)
    attainment = {t.name: float(met[tiers == t.name].mean()) for t in scenario.tiers if (tiers == t.name).any()}
    print(f"{len(piece)} requests served; SLO attainment per tier (toy engines' speed): {attainment}")
    return attainment


if __name__ == "__main__":
    main()
