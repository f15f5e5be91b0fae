"""The runtime serving deployments on vLLM vs the simulator serving the same deployments, on the same requests.

The colocated-engine check (``benchmarks/sim/fidelity.py``) replays slices on one engine; this one runs whole
deployments through the runtime's serving loop (:mod:`nitsum_runtime.serving`: the simulator's multi-tier scheduler,
engines stepped concurrently, prefill → decode hand-offs with KV migration) and simulates each deployment with
:func:`nitsum_opt.sim.fidelity.simulate_deployment`. Usage:

* ``python benchmarks/sim/serving_fidelity.py plans [--gpus 2] [--slices-to-run mean-8rps,mean-13rps]
  [--out benchmarks/gpu/serving/plans.json]`` — the deployments to serve on ``--gpus`` GPUs: ``colocated`` (one
  colocated TP1 engine per GPU, FCFS, like ``vllm-static-tp1``), ``pd`` (GPU 0 prefill, GPU 1 decode, every tier,
  no admission) and ``nitsum-<slice>`` (what the Nitsum controller deploys for that slice's first 30 s on those
  GPUs, with its admission, seats and central queue); every engine at the scenario's 8,192-token steps;
* on a GPU machine: ``OUT=... bash benchmarks/gpu/run_serving_h200.sh`` (``OUT/<deployment>/measured.csv``,
  ``OUT/meta.json``);
* ``python benchmarks/sim/serving_fidelity.py compare --measured OUT [--out-csv benchmarks/sim/serving-fidelity.csv]
  [--plot benchmarks/sim/serving-fidelity.png]`` — simulate every measured run (the measured engines' KV capacity)
  and print real vs simulated per run and tier.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np

from nitsum_opt.models.spec import Role
from nitsum_opt.sim.controllers.base import ControlContext
from nitsum_opt.sim.controllers.registry import make_controller
from nitsum_opt.sim.controllers.search import StaticEvaluator
from nitsum_opt.sim.controllers.static import vllm_static
from nitsum_opt.sim.deployment import DeployedInstance, Deployment
from nitsum_opt.sim.fidelity import (
    Timings,
    compare,
    format_rows,
    read_measured,
    simulate_deployment,
    slo_met,
    write_comparison_csv,
)
from nitsum_opt.sim.scenario import Scenario
from nitsum_opt.sim.slices import TraceSlice, read_slices
from nitsum_opt.spec import ClusterSpec
from nitsum_runtime.bench_serving import ServingPlans

DEFAULT_SLICES = Path("benchmarks/gpu/fidelity/slices.csv")
DEFAULT_PLANS = Path("benchmarks/gpu/serving/plans.json")


def _scenario(path: Path | None) -> Scenario:
    return Scenario() if path is None else Scenario.load(path)


def engine_budget(dep: Deployment) -> Deployment:
    """``dep`` with every instance at the engine's default step budget (the real engines have one budget)."""
    insts = tuple(i.model_copy(update={"max_num_batched_tokens": None}) for i in dep.instances)
    return dep.model_copy(update={"instances": insts})


def pd_deployment() -> Deployment:
    """GPU 0 prefills every tier, GPU 1 decodes them; no admission control, first come first served."""
    return Deployment(
        instances=(
            DeployedInstance(tier=None, tp=1, role=Role.PREFILL, gpu_ids=(0,)),
            DeployedInstance(tier=None, tp=1, role=Role.DECODE, gpu_ids=(1,)),
        ),
        label="1×tp1-prefill + 1×tp1-decode",
    )


def nitsum_deployment(scenario: Scenario, piece: TraceSlice, gpus: int) -> Deployment:
    """What the ``nitsum`` controller deploys on ``gpus`` GPUs from the slice's first epoch of requests."""
    trace = piece.to_trace([t.name for t in scenario.tiers])
    model, _ = scenario.iteration_model()
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=gpus, gpu_type=scenario.cluster.gpu_type)
    settings = scenario.settings
    ev = StaticEvaluator(trace, scenario.tiers, model, scenario.model_spec, cluster, settings)
    ctx = ControlContext(
        cluster=cluster, tiers=scenario.tiers, model_spec=scenario.model_spec, model=model, settings=settings
    )
    dep = make_controller("nitsum", ev).start(ctx, trace.window(0.0, settings.epoch_s))
    return engine_budget(dep).model_copy(update={"label": f"nitsum: {dep.describe()}"})


def make_plans(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    scenario = _scenario(args.scenario)
    pieces = {p.name: p for p in read_slices(args.slices)}
    wanted = [x for x in args.slices_to_run.split(",") if x]
    unknown = sorted(set(wanted) - set(pieces))
    if unknown:
        raise SystemExit(f"--slices-to-run {unknown}: not in {args.slices} ({sorted(pieces)})")
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=args.gpus, gpu_type=scenario.cluster.gpu_type)
    engine = scenario.settings.engine
    colocated = vllm_static(cluster, 1, False, engine.max_num_seqs).model_copy(update={"label": "colocated"})
    deployments = {"colocated": engine_budget(colocated), "pd": pd_deployment()}
    runs = [(name, s) for name in ("pd", "colocated") for s in wanted]
    for s in wanted:
        deployments[f"nitsum-{s}"] = nitsum_deployment(scenario, pieces[s], args.gpus)
        runs.append((f"nitsum-{s}", s))
    plans = ServingPlans(
        model=scenario.model_spec.name,
        tiers=scenario.tiers,
        deployments=deployments,
        runs=tuple(runs),
        max_num_batched_tokens=engine.max_num_batched_tokens,
        max_num_seqs=engine.max_num_seqs,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(plans.model_dump_json(indent=2) + "\n", encoding="utf-8")
    for name, dep in deployments.items():
        print(f"{name}: {dep.describe()} (admission {'on' if dep.admitted_rps else 'off'})")
    print(f"wrote {args.out} ({len(runs)} runs)")
    return 0


def _plot(path: Path, keys: list[str], pieces: dict, real: dict, sim: dict, scenario: Scenario, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(keys), figsize=(3.6 * len(keys), 6.5), squeeze=False)
    for j, key in enumerate(keys):
        piece = pieces[key]
        for i, (metric, label) in enumerate((("ttft_s", "TTFT (ms)"), ("tpot_s", "TPOT (ms)"))):
            ax = axes[i][j]
            for name, timings, style in (("runtime on vLLM", real[key], "-"), ("simulator", sim[key], "--")):
                values = np.sort(getattr(timings, metric)) * 1000.0
                values = values[np.isfinite(values)]
                ax.plot(values, np.arange(1, values.size + 1) / max(values.size, 1), style, label=name)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
            if i == 0:
                met_r = slo_met(piece, real[key], scenario.tiers).mean()
                met_s = slo_met(piece, sim[key], scenario.tiers).mean()
                ax.set_title(f"{key}\nattainment {met_r:.0%} real, {met_s:.0%} sim", fontsize=9)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _handoff_text(info: dict) -> str:
    """Hand-off figures of one run's meta (runs measured before the split hand-off have one batch time)."""
    text = f"hand-offs {info['handoffs']} ({info['migrated']} with KV"
    if "leave_p50_ms" in info:
        return text + (
            f"; leaving the prefill engine p50 {info['leave_p50_ms']} ms, arriving at the decode engine p50 "
            f"{info['arrive_p50_ms']} ms, max {info['arrive_max_ms']} ms)"
        )
    return text + f"; batch p50 {info['handoff_p50_ms']} ms, max {info['handoff_max_ms']} ms)"


def _read_runs(measured: Path, plans: ServingPlans, meta: dict, slices: dict) -> dict[str, tuple[str, Timings]]:
    """Measured timings per run key ``<deployment>/<slice>`` (runs the GPU finished)."""
    out: dict[str, tuple[str, Timings]] = {}
    for dep_name in dict.fromkeys(d for d, _ in plans.runs):
        path = measured / dep_name / "measured.csv"
        if not path.is_file():
            continue
        got = read_measured(path, list(slices.values()))
        for s, timings in got.items():
            if f"{dep_name}/{s}" in meta.get("runs", {}):
                out[f"{dep_name}/{s}"] = (s, timings)
    return out


def run_compare(args: argparse.Namespace) -> int:
    warnings.simplefilter("ignore")
    scenario = _scenario(args.scenario)
    measured = Path(args.measured)
    if not (measured / "meta.json").is_file():
        raise SystemExit(f"--measured {measured}: no meta.json; pass the OUT folder of run_serving_h200.sh")
    meta = json.loads((measured / "meta.json").read_text(encoding="utf-8"))
    plans = ServingPlans.model_validate_json(Path(args.plans).read_text(encoding="utf-8"))
    slices = {p.name: p for p in read_slices(args.slices)}
    runs = _read_runs(measured, plans, meta, slices)
    if not runs:
        raise SystemExit(f"{measured}: no finished run of {args.plans}")
    kv = min(meta["kv_cache_tokens"].values())
    gpus = max(g for group in plans.groups for g in group) + 1
    drain_s = float(meta.get("drain_s", args.drain_s))
    rows, real, sim, pieces = [], {}, {}, {}
    for key, (s, timings) in runs.items():
        dep = plans.deployments[key.split("/")[0]]
        pieces[key], real[key] = slices[s], timings
        sim[key] = simulate_deployment(scenario, slices[s], dep, gpus, drain_s=drain_s, kv_cache_tokens=kv)
        for row in compare(slices[s], timings, sim[key], scenario.tiers):
            rows.append({"deployment": key.split("/")[0], **row})
        info = meta["runs"][key]
        print(f"{key}: {dep.describe()}; {_handoff_text(info)}; held centrally at most {info['max_held']}")
    print(f"{plans.model} on {meta.get('gpu')} x{gpus}; KV cache tokens per engine {meta['kv_cache_tokens']}")
    cols = ("attainment", "goodput_rps", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms")
    print("\n".join(format_rows(rows, ("deployment", "slice", "tier", "requests"), cols)))
    if args.out_csv:
        write_comparison_csv(args.out_csv, rows)
        print(f"wrote {args.out_csv}")
    if args.plot:
        title = f"{plans.model} on {gpus}× {meta.get('gpu')}: the runtime serving deployments vs the simulator"
        _plot(Path(args.plot), list(runs), pieces, real, sim, scenario, title)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plans", help="write the plans file the GPU run serves")
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--slices", type=Path, default=DEFAULT_SLICES)
    p.add_argument("--slices-to-run", default="mean-8rps,mean-13rps")
    p.add_argument("--scenario", type=Path, default=None, help="scenario YAML (default: the bundled default)")
    p.add_argument("--out", type=Path, default=DEFAULT_PLANS)
    c = sub.add_parser("compare", help="simulate the measured runs and compare")
    c.add_argument("--measured", required=True, help="OUT folder of benchmarks/gpu/run_serving_h200.sh")
    c.add_argument("--plans", type=Path, default=DEFAULT_PLANS)
    c.add_argument("--slices", type=Path, default=DEFAULT_SLICES)
    c.add_argument("--scenario", type=Path, default=None)
    c.add_argument("--drain-s", type=float, default=60.0, help="drain when meta.json does not record it")
    c.add_argument("--out-csv", default="")
    c.add_argument("--plot", default="")
    args = ap.parse_args(argv)
    return make_plans(args) if args.cmd == "plans" else run_compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
