"""Bit-for-bit comparison of two runs of the same probe requests, with a diagnosis of the first difference.

The TP-switch benchmarks run probe requests on a TP1 engine before and after a round trip through other TP
degrees (and twice in a row before it, as a control). A bare ``a == b`` says only *that* they differ; this
module says *where* and *how*: the first (request, step) that differs, whether the greedy token changed,
whether only the order of tied top-k entries changed (same ids, same sorted log-probabilities), or by how
much the log-probabilities moved (1e-7: numerics; 1e-1: wrong weights or KV). Engine-agnostic: a run is, per
request, a list of steps ``(token_id, top_ids, top_logprobs)``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from nitsum_opt.models.spec import Frozen

#: One decoding step of one request: the generated token, the top-k ids and their log-probabilities.
Step = tuple[int, Sequence[int], Sequence[float]]


class ProbeComparison(Frozen):
    """Outcome of :func:`compare_probe_runs`."""

    identical: bool
    """Every request has the same tokens, top-k ids (in order) and log-probabilities (exactly)."""
    requests: int = Field(ge=0)
    """Requests compared."""
    steps: int = Field(ge=0)
    """Steps compared (up to each request's first token difference)."""
    differing_requests: int = Field(ge=0)
    """Requests with any difference."""
    first_difference: str = ""
    """Where and how the runs first differ (empty when identical)."""
    kind: str = ""
    """``""`` (identical), ``tie-order`` (only tied top-k entries swapped), ``logprobs`` (values differ, same
    tokens), ``token`` (a greedy token differs), ``length`` (different numbers of steps)."""
    max_logprob_diff: float = Field(default=0.0, ge=0)
    """Largest |difference| of sorted top-k log-probabilities over the steps where both runs had the same
    context (up to and including each request's first token difference)."""


def _sorted_diff(a: Sequence[float], b: Sequence[float]) -> float:
    xs, ys = sorted(a, reverse=True), sorted(b, reverse=True)
    if len(xs) != len(ys):
        return float("inf")
    return max((abs(x - y) for x, y in zip(xs, ys, strict=True)), default=0.0)


def _step_kind(a: Step, b: Step) -> str:
    if a[0] != b[0]:
        return "token"
    if list(a[2]) != list(b[2]) and _sorted_diff(a[2], b[2]) > 0:
        return "logprobs"
    return "tie-order"  # same token, same multiset of log-probabilities, ids in another order


def compare_probe_runs(
    a: Sequence[Sequence[Step]], b: Sequence[Sequence[Step]], names: Sequence[str] | None = None
) -> ProbeComparison:
    """Compare run ``a`` with run ``b`` request by request (same order; ``names`` label them)."""
    if len(a) != len(b):
        raise ValueError(f"run a has {len(a)} requests, run b {len(b)}; compare runs of the same probes")
    labels = list(names) if names is not None else [str(i) for i in range(len(a))]
    first, kind, steps, differing, worst = "", "", 0, 0, 0.0
    for label, ra, rb in zip(labels, a, b, strict=True):
        bad = None
        for i, (sa, sb) in enumerate(zip(ra, rb, strict=False)):
            steps += 1
            worst = max(worst, _sorted_diff(sa[2], sb[2]))
            same = sa[0] == sb[0] and list(sa[1]) == list(sb[1]) and list(sa[2]) == list(sb[2])
            if not same:
                bad = (i, sa, sb)
                break
        if bad is None and len(ra) == len(rb):
            continue
        differing += 1
        if bad is None:
            where, what = f"request {label}: {len(ra)} vs {len(rb)} steps", "length"
        else:
            i, sa, sb = bad
            what = _step_kind(sa, sb)
            where = (
                f"request {label} step {i}: token {sa[0]} vs {sb[0]}; top ids {list(sa[1])} vs {list(sb[1])}; "
                f"max |sorted logprob diff| {_sorted_diff(sa[2], sb[2]):.3g}"
            )
        if not first:
            first, kind = where, what
    return ProbeComparison(
        identical=differing == 0,
        requests=len(a),
        steps=steps,
        differing_requests=differing,
        first_difference=first,
        kind=kind,
        max_logprob_diff=worst,
    )
