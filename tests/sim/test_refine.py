"""The oracle's local search (:mod:`nitsum_opt.sim.controllers.refine`): the neighbours of a plan, and a refined
plan that is never worse than where it started and beats a deliberately bad start."""

from __future__ import annotations

from nitsum_opt.models.spec import ServingConfig
from nitsum_opt.sim.controllers.refine import build_variant, neighbours, refine
from nitsum_opt.sim.controllers.search import StaticEvaluator, TieredOrigin, tiered_candidates
from nitsum_opt.sim.settings import SimSettings
from nitsum_opt.spec import SHARED_TIER, ClusterSpec

from sim_factories import LLAMA, ROOFLINE, TIERS, poisson_trace

P, D, C = (ServingConfig.parse(k) for k in ("tp1-prefill", "tp1-decode", "tp1-colocated"))


def _key(counts: dict) -> tuple:
    return tuple(sorted((t, str(c), n) for (t, c), n in counts.items()))


def test_neighbours_known_answer() -> None:
    counts = {("chat", P): 4, ("chat", D): 3, (SHARED_TIER, C): 1}
    got = {_key(n) for n in neighbours(counts, "chat")}
    expected = {
        _key({("chat", P): 3, ("chat", D): 4, (SHARED_TIER, C): 1}),
        _key({("chat", P): 5, ("chat", D): 2, (SHARED_TIER, C): 1}),
        _key({("chat", P): 5, ("chat", D): 3}),
        _key({("chat", P): 4, ("chat", D): 4}),
    }
    assert got == expected
    assert len(neighbours(counts, "chat")) == 4  # no duplicates
    # every move keeps the GPU count
    assert all(sum(n.values()) == 8 for n in neighbours(counts, "chat"))


def test_refine_never_loses_and_climbs_from_a_bad_start() -> None:
    ev = StaticEvaluator(
        poisson_trace(160.0, 20.0, seed=5), TIERS, ROOFLINE, LLAMA, ClusterSpec.with_gpus(4), SimSettings(drain_s=30.0)
    )
    origins: dict[str, TieredOrigin] = {}
    candidates = tiered_candidates(ev, origins)
    assert set(origins) == {ev.key(d) for d in candidates}
    for dep in candidates:
        assert ev.goodput(refine(ev, dep, origins)) >= ev.goodput(dep)
    # a plan with no decode instance serves nobody; one move (a prefill becomes a decode) fixes that
    some = next(iter(origins.values()))
    built = build_variant(ev, some, {("chat", P): 4})
    assert built is not None
    bad, origin = built
    origins[ev.key(bad)] = origin
    assert ev.goodput(bad) == 0.0
    refined = refine(ev, bad, origins)
    assert ev.goodput(refined) > 50.0 and refined.label.endswith("[refined]")
    assert refined.describe() in {"chat:1×tp1-decode chat:3×tp1-prefill", "chat:2×tp1-decode chat:2×tp1-prefill"}


def test_refine_leaves_non_tiered_deployments_alone() -> None:
    from nitsum_opt.sim.controllers.static import vllm_static

    ev = StaticEvaluator(poisson_trace(5.0, 10.0), TIERS, ROOFLINE, LLAMA, ClusterSpec.with_gpus(2), SimSettings())
    dep = vllm_static(ev.cluster, 1, False, 1024)
    assert refine(ev, dep, {}) is dep
