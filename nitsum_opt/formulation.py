r"""The Nitsum allocation MILP: TP degree, role and count of instances per tier, and admitted rate per tier.

Data
----
* tiers :math:`t \in T` with weight :math:`w_t`, forecast rate :math:`\lambda_t` (req/s) and minimum admitted
  fraction :math:`m_t`;
* candidate configs :math:`c = (tp_c, role_c) \in C`, each instance using :math:`g_c = tp_c` GPUs of one node;
  :math:`C^P, C^D, C^{Co}` are the prefill, decode and colocated configs;
* :math:`R_{t,c} \ge 0`: SLO-compliant rate of one instance of :math:`c` for tier :math:`t` (capacity table);
* a pool of :math:`N` nodes of :math:`B` GPUs; :math:`S` the TP sizes in :math:`C`;
* the running plan :math:`n^0_{t,c}` (zero at the first epoch);
* prices: :math:`\varepsilon` per GPU in use, :math:`\beta_{t,c} = w_t\, g_c\, \rho_t\, \sigma / H` per instance
  added or removed (each GPU is out of service :math:`\sigma` s, losing the tier's best per-GPU rate
  :math:`\rho_t = \max_c R_{t,c}/g_c`; amortised over a plan lifetime of :math:`H` s).

Variables
---------
* ``n[t,c]`` :math:`\in \mathbb{Z}`, :math:`0 \le n_{t,c} \le U_{t,c}`: instances of config :math:`c` for tier
  :math:`t`, with the data-derived bound
  :math:`U_{t,c} = \min(N\lfloor B/g_c\rfloor,\ \max(n^0_{t,c}, \lceil \lambda_t / R_{t,c}\rceil))` — an instance
  beyond what the demand needs only adds cost, so some optimum always satisfies it (no big-M) — and
  :math:`U_{t,c} = 0` for a *dominated* config that is not running: one whose GPUs, split into
  :math:`k = g_c / g_{c'}` aligned instances of a smaller config :math:`c'` of the same role, serve at least as
  much (:math:`k R_{t,c'} \ge R_{t,c}`). Swapping each such instance for the :math:`k` smaller ones keeps every
  row feasible (smaller aligned groups pack wherever the big one did), costs the same GPUs and the same churn
  price (:math:`\beta` is per GPU), and never lowers the objective; removing these columns is what keeps the
  solver's tree small;
* ``b[t]`` :math:`\in \mathbb{Z}_{\ge 0}`: GPUs given to tier :math:`t` (an aggregate of ``n``; branching on it
  first settles how the pool is split between tiers, which cut the solver's tree up to 40x on the hard tail of
  ``nitsum bench solve``);
* ``y[t]`` :math:`\ge 0`: admitted SLO-guaranteed rate (traffic above it is served best-effort);
* ``up[t,c]``, ``down[t,c]`` :math:`\ge 0`: instances added / removed relative to the running plan
  (only when a running plan is given).

Model
-----
.. math::

   \max\ & \sum_t w_t y_t - \varepsilon \sum_{t,c} g_c n_{t,c} - \sum_{t,c} \beta_{t,c}(up_{t,c} + down_{t,c}) \\
   \text{demand\_cap}[t]:\ & y_t \le \lambda_t \\
   \text{min\_admission}[t]:\ & y_t \ge m_t \lambda_t \qquad (m_t > 0) \\
   \text{tier\_gpus}[t]:\ & b_t = \textstyle\sum_{c} g_c n_{t,c} \\
   \text{gpu\_budget}:\ & \textstyle\sum_{t} b_t \le N B \\
   \text{node\_packing}[s]:\ & \textstyle\sum_{t,c:\,g_c \ge s} g_c n_{t,c} \le N\, s \lfloor B/s \rfloor
      \qquad (s \in S,\ B \bmod s \ne 0) \\
   \text{prefill\_capacity}[t]:\ & y_t \le \textstyle\sum_{c \in C^P \cup C^{Co}} R_{t,c} n_{t,c} \\
   \text{decode\_capacity}[t]:\ & y_t \le \textstyle\sum_{c \in C^D \cup C^{Co}} R_{t,c} n_{t,c} \\
   \text{churn\_balance}[t,c]:\ & n_{t,c} - up_{t,c} + down_{t,c} = n^0_{t,c}

Why it is exact. Colocated instances appear in both capacity rows, so the two rows say
:math:`y_t \le \min(P_t, D_t) + Co_t`: the disaggregated path needs prefill *and* decode capacity, the
colocated path serves whole requests. TP sizes are powers of two, so a multiset of instance sizes fits into
:math:`N` nodes of :math:`B` GPUs iff, for every size :math:`s`, the instances of size :math:`\ge s` fit into
the :math:`s`-aligned room :math:`N s\lfloor B/s \rfloor` (sizes divide each other, so first-fit-decreasing with
aligned offsets never fragments); when :math:`s` divides :math:`B` that row is implied by ``gpu_budget`` and is
left out. :func:`nitsum_opt.placement.place_instances` turns any feasible ``n`` into GPU ids.

This module consumes numbers only: it never imports a solver package or a latency model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nitsum_opt.models.spec import Role, ServingConfig
from nitsum_opt.solvers.model import LinearModel, Variable
from nitsum_opt.spec import PlanningInput

_PREFILL_SIDE = (Role.PREFILL, Role.COLOCATED)
_DECODE_SIDE = (Role.DECODE, Role.COLOCATED)


@dataclass(frozen=True)
class Formulation:
    """The built model and the handles needed to read a solution back."""

    model: LinearModel
    n: dict[tuple[str, ServingConfig], Variable]
    b: dict[str, Variable]
    y: dict[str, Variable]
    up: dict[tuple[str, ServingConfig], Variable]
    down: dict[tuple[str, ServingConfig], Variable]

    def counts(self, values: dict[str, float]) -> dict[tuple[str, ServingConfig], int]:
        """``n[t,c]`` rounded from a solution."""
        return {key: round(values[var.name]) for key, var in self.n.items() if round(values[var.name]) > 0}

    def admitted(self, values: dict[str, float]) -> dict[str, float]:
        """``y[t]`` from a solution."""
        return {tier: max(0.0, values[var.name]) for tier, var in self.y.items()}


def build_formulation(inp: PlanningInput) -> Formulation:
    """Build the MILP for ``inp`` (see the module docstring for the math)."""
    model = LinearModel(name="nitsum_allocation", maximize=True)
    n = _add_instance_variables(model, inp)
    b = {t.name: model.add_variable(f"b[{t.name}]", lb=0, ub=inp.cluster.total_gpus, integer=True) for t in inp.tiers}
    y = {t.name: model.add_variable(f"y[{t.name}]", lb=0.0, ub=math.inf) for t in inp.tiers}
    up, down = _add_churn_variables(model, inp, n)
    add_demand_cap(model, inp, y)
    add_min_admission(model, inp, y)
    add_tier_gpus(model, inp, n, b)
    add_gpu_budget(model, inp, b)
    add_node_packing(model, inp, n)
    add_prefill_capacity(model, inp, n, y)
    add_decode_capacity(model, inp, n, y)
    add_churn_balance(model, inp, n, up, down)
    set_objective(model, inp, n, y, up, down)
    return Formulation(model=model, n=n, b=b, y=y, up=up, down=down)


def is_dominated(inp: PlanningInput, tier: str, config: ServingConfig) -> bool:
    """True when ``k`` instances of a smaller config of the same role on the same GPUs serve at least as much."""
    rate = inp.capacity.rate_rps(tier, config)
    for other in inp.candidate_configs:
        if other.role is config.role and other.gpus < config.gpus and config.gpus % other.gpus == 0:
            k = config.gpus // other.gpus
            if k * inp.capacity.rate_rps(tier, other) >= rate:
                return True
    return False


def instance_upper_bound(inp: PlanningInput, tier: str, config: ServingConfig) -> int:
    """:math:`U_{t,c}`: most instances of ``config`` for ``tier`` some optimal plan uses."""
    cluster = inp.cluster
    fit = cluster.num_nodes * (cluster.gpus_per_node // config.gpus)
    current = inp.current_plan.count(tier, config) if inp.current_plan else 0
    if current == 0 and is_dominated(inp, tier, config):
        return 0
    rate = inp.capacity.rate_rps(tier, config)
    needed = math.ceil(inp.demand_rps(tier) / rate - 1e-9) if rate > 0 else 0
    return min(fit, max(current, needed))


def _add_instance_variables(model: LinearModel, inp: PlanningInput) -> dict[tuple[str, ServingConfig], Variable]:
    return {
        (t.name, c): model.add_variable(
            f"n[{t.name},{c.key}]", lb=0, ub=instance_upper_bound(inp, t.name, c), integer=True
        )
        for t in inp.tiers
        for c in inp.candidate_configs
    }


def _add_churn_variables(
    model: LinearModel, inp: PlanningInput, n: dict[tuple[str, ServingConfig], Variable]
) -> tuple[dict[tuple[str, ServingConfig], Variable], dict[tuple[str, ServingConfig], Variable]]:
    if inp.current_plan is None:
        return {}, {}
    up, down = {}, {}
    for (tier, c), var in n.items():
        current = inp.current_plan.count(tier, c)
        up[tier, c] = model.add_variable(f"up[{tier},{c.key}]", lb=0.0, ub=var.ub)
        down[tier, c] = model.add_variable(f"down[{tier},{c.key}]", lb=0.0, ub=float(current))
    return up, down


def add_demand_cap(model: LinearModel, inp: PlanningInput, y: dict[str, Variable]) -> None:
    """(1) ``demand_cap[t]``: admit no more than the forecast rate."""
    for t in inp.tiers:
        model.add_constraint(f"demand_cap[{t.name}]", {y[t.name]: 1.0}, ub=inp.demand_rps(t.name))


def add_min_admission(model: LinearModel, inp: PlanningInput, y: dict[str, Variable]) -> None:
    """(1b) ``min_admission[t]``: guarantee the tier's minimum admitted fraction (tiers with ``m_t > 0``)."""
    for t in inp.tiers:
        if t.min_admission > 0:
            model.add_constraint(
                f"min_admission[{t.name}]", {y[t.name]: 1.0}, lb=t.min_admission * inp.demand_rps(t.name)
            )


def add_tier_gpus(
    model: LinearModel, inp: PlanningInput, n: dict[tuple[str, ServingConfig], Variable], b: dict[str, Variable]
) -> None:
    """(2a) ``tier_gpus[t]``: ``b[t]`` counts the GPUs of the tier's instances."""
    for t in inp.tiers:
        terms: dict[Variable, float] = {var: float(c.gpus) for (tier, c), var in n.items() if tier == t.name}
        terms[b[t.name]] = -1.0
        model.add_constraint(f"tier_gpus[{t.name}]", terms, lb=0.0, ub=0.0)


def add_gpu_budget(model: LinearModel, inp: PlanningInput, b: dict[str, Variable]) -> None:
    """(2) ``gpu_budget``: the tiers use at most the pool's GPUs."""
    model.add_constraint("gpu_budget", {var: 1.0 for var in b.values()}, ub=inp.cluster.total_gpus)


def add_node_packing(model: LinearModel, inp: PlanningInput, n: dict[tuple[str, ServingConfig], Variable]) -> None:
    """(2b) ``node_packing[s]``: instances of size >= s fit in the s-aligned room of the nodes (only the rows
    that ``gpu_budget`` does not already imply, i.e. sizes that do not divide the node)."""
    nodes, per_node = inp.cluster.num_nodes, inp.cluster.gpus_per_node
    for size in sorted({c.gpus for c in inp.candidate_configs}):
        if per_node % size == 0:
            continue
        room = nodes * size * (per_node // size)
        terms = {var: float(c.gpus) for (_, c), var in n.items() if c.gpus >= size}
        model.add_constraint(f"node_packing[{size}]", terms, ub=room)


def _capacity_terms(
    inp: PlanningInput,
    tier: str,
    n: dict[tuple[str, ServingConfig], Variable],
    y: dict[str, Variable],
    roles: tuple[Role, ...],
) -> dict[Variable, float]:
    terms = {y[tier]: 1.0}
    for (t, c), var in n.items():
        if t == tier and c.role in roles:
            terms[var] = -inp.capacity.rate_rps(tier, c)
    return terms


def add_prefill_capacity(
    model: LinearModel, inp: PlanningInput, n: dict[tuple[str, ServingConfig], Variable], y: dict[str, Variable]
) -> None:
    """(3a) ``prefill_capacity[t]``: admitted rate within prefill + colocated capacity."""
    for t in inp.tiers:
        model.add_constraint(f"prefill_capacity[{t.name}]", _capacity_terms(inp, t.name, n, y, _PREFILL_SIDE), ub=0.0)


def add_decode_capacity(
    model: LinearModel, inp: PlanningInput, n: dict[tuple[str, ServingConfig], Variable], y: dict[str, Variable]
) -> None:
    """(3b) ``decode_capacity[t]``: admitted rate within decode + colocated capacity (KV memory folded into R)."""
    for t in inp.tiers:
        model.add_constraint(f"decode_capacity[{t.name}]", _capacity_terms(inp, t.name, n, y, _DECODE_SIDE), ub=0.0)


def add_churn_balance(
    model: LinearModel,
    inp: PlanningInput,
    n: dict[tuple[str, ServingConfig], Variable],
    up: dict[tuple[str, ServingConfig], Variable],
    down: dict[tuple[str, ServingConfig], Variable],
) -> None:
    """(4) ``churn_balance[t,c]``: ``n − up + down = n⁰`` (only with a running plan)."""
    if inp.current_plan is None:
        return
    for (tier, c), var in n.items():
        current = float(inp.current_plan.count(tier, c))
        model.add_constraint(
            f"churn_balance[{tier},{c.key}]", {var: 1.0, up[tier, c]: -1.0, down[tier, c]: 1.0}, lb=current, ub=current
        )


def set_objective(
    model: LinearModel,
    inp: PlanningInput,
    n: dict[tuple[str, ServingConfig], Variable],
    y: dict[str, Variable],
    up: dict[tuple[str, ServingConfig], Variable],
    down: dict[tuple[str, ServingConfig], Variable],
) -> None:
    """``max Σ w_t y_t − ε Σ g_c n[t,c] − Σ β[t,c] (up + down)``."""
    terms: dict[Variable, float] = {y[t.name]: t.weight for t in inp.tiers}
    eps = inp.objective.gpu_cost
    for (_, c), var in n.items():
        terms[var] = -eps * c.gpus
    for key, var in up.items():
        beta = inp.churn_price(key[0], key[1])
        terms[var] = -beta
        terms[down[key]] = -beta
    model.set_objective(terms, maximize=True)
