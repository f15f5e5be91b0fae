r"""The Nitsum allocation MILP: TP degree, role and count of instances per tier, shared instances, and admitted
rate per tier.

Data
----
* tiers :math:`t \in T` with weight :math:`w_t`, forecast rate :math:`\lambda_t` (req/s) and minimum admitted
  fraction :math:`m_t`;
* candidate configs :math:`c = (tp_c, role_c) \in C`, each instance using :math:`g_c = tp_c` GPUs of one node;
  :math:`C^P, C^D, C^{Co}` are the prefill, decode and colocated configs;
* :math:`R_{t,c} \ge 0`: SLO-compliant rate of one instance of :math:`c` for tier :math:`t` (capacity table), and
  :math:`R^s_{t,c} \ge 0` (:math:`c \in C^S`, below) the rate of tier :math:`t` one *shared* instance serves while
  it batches the other tiers' requests with it (``PlanningInput.shared_capacity``; default :math:`R_{t,c}`);
* a pool of :math:`N` nodes of :math:`B` GPUs; :math:`S` the TP sizes in :math:`C`;
* the running plan :math:`n^0_{t,c}` and :math:`s^0_c` (zero at the first epoch);
* prices: :math:`\varepsilon` per GPU of a dedicated instance, :math:`\varepsilon_s` per GPU of a shared one,
  :math:`\beta_{t,c} = w_t\, g_c\, \rho_t\, \sigma / H` per dedicated instance added or removed (each GPU is out
  of service :math:`\sigma` s, losing the tier's best per-GPU rate :math:`\rho_t = \max_c R_{t,c}/g_c`; amortised
  over a plan lifetime of :math:`H` s) and :math:`\beta^s_c = g_c \max_t (w_t \rho_t)\, \sigma / H` per shared
  instance (a shared GPU may be serving any tier).

Variables
---------
* ``n[t,c]`` :math:`\in \mathbb{Z}`, :math:`0 \le n_{t,c} \le U_{t,c}`: instances of config :math:`c` dedicated
  to tier :math:`t`, with the data-derived bound
  :math:`U_{t,c} = \min(N\lfloor B/g_c\rfloor,\ \max(n^0_{t,c}, \lceil \lambda_t / R_{t,c}\rceil))` — an instance
  beyond what the demand needs only adds cost, so some optimum always satisfies it (no big-M) — and
  :math:`U_{t,c} = 0` for a *dominated* config that is not running: one whose GPUs, split into
  :math:`k = g_c / g_{c'}` aligned instances of a smaller config :math:`c'` of the same role, serve at least as
  much (:math:`k R_{t,c'} \ge R_{t,c}`). Swapping each such instance for the :math:`k` smaller ones keeps every
  row feasible (smaller aligned groups pack wherever the big one did), costs the same GPUs and the same churn
  price (:math:`\beta` is per GPU), and never lowers the objective; removing these columns is what keeps the
  solver's tree small;
* ``s[c]`` :math:`\in \mathbb{Z}`, :math:`0 \le s_c \le U^s_c`, :math:`c \in C^S` (left out where
  :math:`U^s_c = 0`): *shared* instances, which serve every tier with tier priority; :math:`C^S` are the configs
  of the roles in ``PlanningInput.shared_roles`` (default :math:`C^S = C^{Co}`), with
  :math:`U^s_c = \min(N\lfloor B/g_c\rfloor,\ \max(s^0_c, \lceil \sum_{t: R^s_{t,c} > 0} \lambda_t / R^s_{t,c}\rceil))`
  (the time-sharing row below never needs more) and :math:`U^s_c = 0` for a config that is not running and is
  dominated for *every* tier at once (then the same swap works for the whole rate mix). When sharing is never
  cheaper nor faster (:math:`\varepsilon_s \ge \varepsilon`, :math:`R^s_{t,c} \le R_{t,c}` for every tier, the
  default) two more cuts hold for some optimum: (i) while :math:`s_c > s^0_c`, no tier uses a whole shared
  instance, :math:`x_{t,c} < R^s_{t,c}` — else that instance becomes one dedicated to the tier (no less
  capacity, no more GPU price, churn :math:`\beta_{t,c} \le \beta^s_c` added for :math:`\beta^s_c` saved), so
  :math:`x_{t,c} \le R^s_{t,c} \max(1, s^0_c)`; (ii) then :math:`s_c \le |T|` (the shares sum to less than
  :math:`|T|`, a further instance is idle) and, with none running, :math:`s_c \le |T| - 1` (:math:`|T|` shared
  instances become one dedicated instance per tier), so :math:`U^s_c \le \max(s^0_c, |T|)`, or :math:`|T| - 1`
  when :math:`s^0_c = 0` (a single tier never shares). Without them the solver spent its time proving that no
  pool helps (``nitsum bench solve`` p99 at 128 GPUs 22.7 ms, see ``benchmarks/RESULTS.md``);
* ``x[t,c]`` :math:`\ge 0`, :math:`c \in C^S` with :math:`R^s_{t,c} > 0` and :math:`U^s_c > 0`: rate of tier
  :math:`t` served on the shared instances of :math:`c`, at most :math:`\min(\lambda_t, R^s_{t,c} U^s_c)`;
* ``b[t]`` :math:`\in \mathbb{Z}_{\ge 0}`: GPUs dedicated to tier :math:`t`, and ``b_shared`` the GPUs of shared
  instances (aggregates; branching on them first settles how the pool is split, which cut the solver's tree up to
  40x on the hard tail of ``nitsum bench solve``);
* ``y[t]`` :math:`\ge 0`: admitted SLO-guaranteed rate (traffic above it is served best-effort);
* ``up[t,c]``, ``down[t,c]``, ``up_s[c]``, ``down_s[c]`` :math:`\ge 0`: instances added / removed relative to the
  running plan (only when a running plan is given).

Model
-----
.. math::

   \max\ & \sum_t w_t y_t - \varepsilon \sum_{t,c} g_c n_{t,c} - \varepsilon_s \sum_c g_c s_c
          - \sum_{t,c} \beta_{t,c}(up_{t,c} + down_{t,c}) - \sum_c \beta^s_c (up^s_c + down^s_c) \\
   \text{demand\_cap}[t]:\ & y_t \le \lambda_t \\
   \text{min\_admission}[t]:\ & y_t \ge m_t \lambda_t \qquad (m_t > 0) \\
   \text{tier\_gpus}[t]:\ & b_t = \textstyle\sum_{c} g_c n_{t,c} \\
   \text{shared\_gpus}:\ & b^s = \textstyle\sum_{c} g_c s_c \\
   \text{gpu\_budget}:\ & \textstyle\sum_{t} b_t + b^s \le N B \\
   \text{node\_packing}[s]:\ & \textstyle\sum_{c:\,g_c \ge s} g_c (\sum_t n_{t,c} + s_c) \le N\, s \lfloor B/s \rfloor
      \qquad (s \in S,\ B \bmod s \ne 0) \\
   \text{prefill\_capacity}[t]:\ & y_t \le \textstyle\sum_{c \in C^P \cup C^{Co}} (R_{t,c} n_{t,c}
      + x_{t,c}) \\
   \text{decode\_capacity}[t]:\ & y_t \le \textstyle\sum_{c \in C^D \cup C^{Co}} (R_{t,c} n_{t,c}
      + x_{t,c}) \\
   \text{shared\_capacity}[c]:\ & \textstyle\sum_{t} x_{t,c} / R^s_{t,c} \le s_c \\
   \text{churn\_balance}[t,c]:\ & n_{t,c} - up_{t,c} + down_{t,c} = n^0_{t,c} \\
   \text{shared\_churn}[c]:\ & s_c - up^s_c + down^s_c = s^0_c

Why it is exact. Colocated instances appear in both capacity rows, so the two rows say
:math:`y_t \le \min(P_t + X^P_t, D_t + X^D_t) + Co_t + X^{Co}_t`: the disaggregated path needs prefill *and*
decode capacity (dedicated or shared), the colocated path (dedicated or shared) serves whole requests. TP sizes
are powers of two, so a multiset of instance sizes fits into :math:`N` nodes of :math:`B` GPUs iff, for every
size :math:`s`, the instances of size :math:`\ge s` fit into the :math:`s`-aligned room
:math:`N s\lfloor B/s \rfloor` (sizes divide each other, so first-fit-decreasing with aligned offsets never
fragments); when :math:`s` divides :math:`B` that row is implied by ``gpu_budget`` and is left out.
:func:`nitsum_opt.placement.place_instances` turns any feasible ``n``, ``s`` into
GPU ids.

Shared instances and what is approximated. A dedicated instance rounds its tier's demand up to whole
instances; two tiers that each need 1.5 instances take 4 of them dedicated, 3 shared. The *time-sharing* row
``shared_capacity[c]`` says each unit of tier-:math:`t` rate uses :math:`1/R^s_{t,c}` of a shared instance, as if
the instance served each tier alone for a share of the time. Real tier-priority scheduling batches the tiers
together, so this is an approximation: the strictest tier's TPOT bounds the batch the looser tiers ride in (the
scheduler counts their requests in seats weighted by their mix, :mod:`nitsum_opt.scheduler`; a table
:math:`R^s` built at the strictest TPOT target prices that in, the default :math:`R^s = R` does not), the strict
tier meets its TTFT more easily than its share says, and the queueing headroom in :math:`R^s_{t,c}` is not pooled
(the statistical multiplexing of a larger pool is not credited). ``benchmarks/RESULTS.md`` measures both in the
simulator. Shared prefill and decode instances (``shared_roles``) enter only the row of their side, so a tier may
be prefilled on a shared prefill instance and decoded on a shared or a dedicated decode instance; a shared decode
instance batches every tier's decodes at the strictest TPOT, so :math:`R^s` should be built at that target (the
Nitsum controller does; with the default :math:`R^s = R` the looser tiers' cells would overstate it). Without
shared instances (``shared=False``) the model is the dedicated-only one of DESIGN §4.

This module consumes numbers only: it never imports a solver package or a latency model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nitsum_opt.models.spec import Role, ServingConfig
from nitsum_opt.solvers.model import LinearModel, Variable
from nitsum_opt.spec import SHARED_TIER, PlanningInput

_PREFILL_SIDE = (Role.PREFILL, Role.COLOCATED)
_DECODE_SIDE = (Role.DECODE, Role.COLOCATED)

Keyed = dict[tuple[str, ServingConfig], Variable]
Shared = dict[ServingConfig, Variable]


@dataclass(frozen=True)
class Formulation:
    """The built model and the handles needed to read a solution back."""

    model: LinearModel
    n: Keyed
    b: dict[str, Variable]
    y: dict[str, Variable]
    up: Keyed
    down: Keyed
    s: Shared
    x: Keyed
    up_s: Shared
    down_s: Shared

    def counts(self, values: dict[str, float]) -> dict[tuple[str, ServingConfig], int]:
        """``n[t,c]`` and, as tier ``"*"``, ``s[c]``, rounded from a solution (zeros left out)."""
        out = {key: round(values[var.name]) for key, var in self.n.items()}
        out |= {(SHARED_TIER, c): round(values[var.name]) for c, var in self.s.items()}
        return {key: k for key, k in out.items() if k > 0}

    def admitted(self, values: dict[str, float]) -> dict[str, float]:
        """``y[t]`` from a solution."""
        return {tier: max(0.0, values[var.name]) for tier, var in self.y.items()}

    def shared_rates(self, values: dict[str, float]) -> dict[str, dict[ServingConfig, float]]:
        """``x[t,c]`` from a solution, per tier (positive entries only)."""
        out: dict[str, dict[ServingConfig, float]] = {}
        for (tier, c), var in self.x.items():
            if values[var.name] > 0:
                out.setdefault(tier, {})[c] = values[var.name]
        return out


def build_formulation(inp: PlanningInput, shared: bool = True) -> Formulation:
    """Build the MILP for ``inp`` (see the module docstring); ``shared=False`` leaves shared instances out."""
    model = LinearModel(name="nitsum_allocation", maximize=True)
    n = _add_instance_variables(model, inp)
    s, x = _add_shared_variables(model, inp) if shared else ({}, {})
    b = {t.name: model.add_variable(f"b[{t.name}]", lb=0, ub=inp.cluster.total_gpus, integer=True) for t in inp.tiers}
    b_shared = model.add_variable("b_shared", lb=0, ub=inp.cluster.total_gpus, integer=True) if s else None
    y = {t.name: model.add_variable(f"y[{t.name}]", lb=0.0, ub=math.inf) for t in inp.tiers}
    up, down = _add_churn_variables(model, inp, n)
    up_s, down_s = _add_shared_churn_variables(model, inp, s)
    add_demand_cap(model, inp, y)
    add_min_admission(model, inp, y)
    add_tier_gpus(model, inp, n, b)
    add_shared_gpus(model, s, b_shared)
    add_gpu_budget(model, inp, b, b_shared)
    add_node_packing(model, inp, n, s)
    add_prefill_capacity(model, inp, n, x, y)
    add_decode_capacity(model, inp, n, x, y)
    add_shared_capacity(model, inp, s, x)
    add_churn_balance(model, inp, n, up, down)
    add_shared_churn(model, inp, s, up_s, down_s)
    set_objective(model, inp, n, s, y, (up, down), (up_s, down_s))
    return Formulation(model=model, n=n, b=b, y=y, up=up, down=down, s=s, x=x, up_s=up_s, down_s=down_s)


def is_dominated(inp: PlanningInput, tier: str, config: ServingConfig) -> bool:
    """True when ``k`` instances of a smaller config of the same role on the same GPUs serve at least as much."""
    rate = inp.capacity.rate_rps(tier, config)
    for other in inp.candidate_configs:
        if other.role is config.role and other.gpus < config.gpus and config.gpus % other.gpus == 0:
            k = config.gpus // other.gpus
            if k * inp.capacity.rate_rps(tier, other) >= rate:
                return True
    return False


def is_shared_dominated(inp: PlanningInput, config: ServingConfig) -> bool:
    """True when ``k`` instances of one smaller config of the same role serve at least as much for every tier."""
    for other in inp.candidate_configs:
        if other.role is config.role and other.gpus < config.gpus and config.gpus % other.gpus == 0:
            k = config.gpus // other.gpus
            if all(k * inp.shared_rate_rps(t.name, other) >= inp.shared_rate_rps(t.name, config) for t in inp.tiers):
                return True
    return False


def instance_upper_bound(inp: PlanningInput, tier: str, config: ServingConfig) -> int:
    """:math:`U_{t,c}` (:math:`U^s_c` for ``tier = "*"``): most instances of ``config`` some optimal plan uses."""
    cluster = inp.cluster
    fit = cluster.num_nodes * (cluster.gpus_per_node // config.gpus)
    current = inp.current_plan.count(tier, config) if inp.current_plan else 0
    if tier == SHARED_TIER:
        if current == 0 and is_shared_dominated(inp, config):
            return 0
        load = sum(
            inp.demand_rps(t.name) / inp.shared_rate_rps(t.name, config)
            for t in inp.tiers
            if inp.shared_rate_rps(t.name, config) > 0
        )
        needed = math.ceil(load - 1e-9)
        if _sharing_costs_more(inp, config):
            needed = min(needed, len(inp.tiers) - 1 if current == 0 else len(inp.tiers))
        return min(fit, max(current, needed))
    if current == 0 and is_dominated(inp, tier, config):
        return 0
    rate = inp.capacity.rate_rps(tier, config)
    needed = math.ceil(inp.demand_rps(tier) / rate - 1e-9) if rate > 0 else 0
    return min(fit, max(current, needed))


def _sharing_costs_more(inp: PlanningInput, config: ServingConfig) -> bool:
    """Whether a shared instance of ``config`` is never cheaper and never faster than a dedicated one
    (``ε_s >= ε`` and ``R^s[t,c] <= R[t,c]`` for every tier): then some optimum has ``s[c] <= max(s⁰[c], |T|)``."""
    if inp.shared_gpu_cost < inp.objective.gpu_cost:
        return False
    return all(inp.shared_rate_rps(t.name, config) <= inp.capacity.rate_rps(t.name, config) for t in inp.tiers)


def shared_configs(inp: PlanningInput) -> tuple[ServingConfig, ...]:
    """The configs a shared instance may take: the candidates of a role in ``inp.shared_roles``."""
    return inp.shared_configs


def _add_instance_variables(model: LinearModel, inp: PlanningInput) -> Keyed:
    return {
        (t.name, c): model.add_variable(
            f"n[{t.name},{c.key}]", lb=0, ub=instance_upper_bound(inp, t.name, c), integer=True
        )
        for t in inp.tiers
        for c in inp.candidate_configs
    }


def _add_shared_variables(model: LinearModel, inp: PlanningInput) -> tuple[Shared, Keyed]:
    s: Shared = {}
    x: Keyed = {}
    for c in shared_configs(inp):
        bound = instance_upper_bound(inp, SHARED_TIER, c)
        if bound == 0:  # no column at all (a running shared instance always has bound >= 1)
            continue
        s[c] = model.add_variable(f"s[{c.key}]", lb=0, ub=bound, integer=True)
        for t in inp.tiers:
            rate = inp.shared_rate_rps(t.name, c)
            if rate > 0:
                ub = min(inp.demand_rps(t.name), rate * bound)
                if _sharing_costs_more(inp, c):  # some optimum gives no tier a whole shared instance (docstring)
                    ub = min(ub, rate * max(1, inp.current_plan.count(SHARED_TIER, c) if inp.current_plan else 0))
                x[t.name, c] = model.add_variable(f"x[{t.name},{c.key}]", lb=0.0, ub=ub)
    return s, x


def _add_churn_variables(model: LinearModel, inp: PlanningInput, n: Keyed) -> tuple[Keyed, Keyed]:
    if inp.current_plan is None:
        return {}, {}
    up, down = {}, {}
    for (tier, c), var in n.items():
        current = inp.current_plan.count(tier, c)
        up[tier, c] = model.add_variable(f"up[{tier},{c.key}]", lb=0.0, ub=var.ub)
        down[tier, c] = model.add_variable(f"down[{tier},{c.key}]", lb=0.0, ub=float(current))
    return up, down


def _add_shared_churn_variables(model: LinearModel, inp: PlanningInput, s: Shared) -> tuple[Shared, Shared]:
    if inp.current_plan is None:
        return {}, {}
    up, down = {}, {}
    for c, var in s.items():
        current = inp.current_plan.count(SHARED_TIER, c)
        up[c] = model.add_variable(f"up_s[{c.key}]", lb=0.0, ub=var.ub)
        down[c] = model.add_variable(f"down_s[{c.key}]", lb=0.0, ub=float(current))
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


def add_tier_gpus(model: LinearModel, inp: PlanningInput, n: Keyed, b: dict[str, Variable]) -> None:
    """(2a) ``tier_gpus[t]``: ``b[t]`` counts the GPUs of the tier's dedicated instances."""
    for t in inp.tiers:
        terms: dict[Variable, float] = {var: float(c.gpus) for (tier, c), var in n.items() if tier == t.name}
        terms[b[t.name]] = -1.0
        model.add_constraint(f"tier_gpus[{t.name}]", terms, lb=0.0, ub=0.0)


def add_shared_gpus(model: LinearModel, s: Shared, b_shared: Variable | None) -> None:
    """(2a') ``shared_gpus``: ``b_shared`` counts the GPUs of shared instances (only with shared instances)."""
    if b_shared is None:
        return
    terms: dict[Variable, float] = {var: float(c.gpus) for c, var in s.items()}
    terms[b_shared] = -1.0
    model.add_constraint("shared_gpus", terms, lb=0.0, ub=0.0)


def add_gpu_budget(model: LinearModel, inp: PlanningInput, b: dict[str, Variable], b_shared: Variable | None) -> None:
    """(2) ``gpu_budget``: dedicated and shared instances use at most the pool's GPUs."""
    terms = {var: 1.0 for var in b.values()}
    if b_shared is not None:
        terms[b_shared] = 1.0
    model.add_constraint("gpu_budget", terms, ub=inp.cluster.total_gpus)


def add_node_packing(model: LinearModel, inp: PlanningInput, n: Keyed, s: Shared) -> None:
    """(2b) ``node_packing[s]``: instances (dedicated and shared) of size >= s fit in the s-aligned room of the
    nodes (only the rows that ``gpu_budget`` does not already imply, i.e. sizes that do not divide the node)."""
    nodes, per_node = inp.cluster.num_nodes, inp.cluster.gpus_per_node
    for size in sorted({c.gpus for c in inp.candidate_configs}):
        if per_node % size == 0:
            continue
        room = nodes * size * (per_node // size)
        terms = {var: float(c.gpus) for (_, c), var in n.items() if c.gpus >= size}
        terms |= {var: float(c.gpus) for c, var in s.items() if c.gpus >= size}
        model.add_constraint(f"node_packing[{size}]", terms, ub=room)


def _capacity_terms(
    inp: PlanningInput, tier: str, n: Keyed, x: Keyed, y: dict[str, Variable], roles: tuple[Role, ...]
) -> dict[Variable, float]:
    terms = {y[tier]: 1.0}
    for (t, c), var in n.items():
        if t == tier and c.role in roles:
            terms[var] = -inp.capacity.rate_rps(tier, c)
    for (t, c), var in x.items():  # a shared colocated instance counts on both sides, prefill / decode on one
        if t == tier and c.role in roles:
            terms[var] = -1.0
    return terms


def add_prefill_capacity(model: LinearModel, inp: PlanningInput, n: Keyed, x: Keyed, y: dict[str, Variable]) -> None:
    """(3a) ``prefill_capacity[t]``: admitted rate within prefill + colocated capacity + the tier's shared rate."""
    for t in inp.tiers:
        terms = _capacity_terms(inp, t.name, n, x, y, _PREFILL_SIDE)
        model.add_constraint(f"prefill_capacity[{t.name}]", terms, ub=0.0)


def add_decode_capacity(model: LinearModel, inp: PlanningInput, n: Keyed, x: Keyed, y: dict[str, Variable]) -> None:
    """(3b) ``decode_capacity[t]``: admitted rate within decode + colocated capacity + the tier's shared rate
    (KV memory folded into R)."""
    for t in inp.tiers:
        terms = _capacity_terms(inp, t.name, n, x, y, _DECODE_SIDE)
        model.add_constraint(f"decode_capacity[{t.name}]", terms, ub=0.0)


def add_shared_capacity(model: LinearModel, inp: PlanningInput, s: Shared, x: Keyed) -> None:
    """(3c) ``shared_capacity[c]``: the tiers' rates on shared instances of ``c`` time-share them,
    ``Σ_t x[t,c] / R^s[t,c] <= s[c]`` (only configs that may have shared instances)."""
    for c, var in s.items():
        terms: dict[Variable, float] = {
            xv: 1.0 / inp.shared_rate_rps(tier, c) for (tier, xc), xv in x.items() if xc == c
        }
        if not terms:
            continue
        terms[var] = -1.0
        model.add_constraint(f"shared_capacity[{c.key}]", terms, ub=0.0)


def add_churn_balance(model: LinearModel, inp: PlanningInput, n: Keyed, up: Keyed, down: Keyed) -> None:
    """(4) ``churn_balance[t,c]``: ``n − up + down = n⁰`` (only with a running plan)."""
    if inp.current_plan is None:
        return
    for (tier, c), var in n.items():
        current = float(inp.current_plan.count(tier, c))
        model.add_constraint(
            f"churn_balance[{tier},{c.key}]", {var: 1.0, up[tier, c]: -1.0, down[tier, c]: 1.0}, lb=current, ub=current
        )


def add_shared_churn(model: LinearModel, inp: PlanningInput, s: Shared, up_s: Shared, down_s: Shared) -> None:
    """(4') ``shared_churn[c]``: ``s − up_s + down_s = s⁰`` (only with a running plan)."""
    if inp.current_plan is None:
        return
    for c, var in s.items():
        current = float(inp.current_plan.count(SHARED_TIER, c))
        model.add_constraint(
            f"shared_churn[{c.key}]", {var: 1.0, up_s[c]: -1.0, down_s[c]: 1.0}, lb=current, ub=current
        )


def set_objective(
    model: LinearModel,
    inp: PlanningInput,
    n: Keyed,
    s: Shared,
    y: dict[str, Variable],
    churn: tuple[Keyed, Keyed],
    shared_churn: tuple[Shared, Shared],
) -> None:
    """``max Σ w_t y_t − ε Σ g_c n[t,c] − ε_s Σ g_c s[c] − Σ β[t,c] (up + down) − Σ β[*,c] (up_s + down_s)``."""
    terms: dict[Variable, float] = {y[t.name]: t.weight for t in inp.tiers}
    for (_, c), var in n.items():
        terms[var] = -inp.objective.gpu_cost * c.gpus
    for c, var in s.items():
        terms[var] = -inp.shared_gpu_cost * c.gpus
    up, down = churn
    for key, var in up.items():
        beta = inp.churn_price(key[0], key[1])
        terms[var] = -beta
        terms[down[key]] = -beta
    up_s, down_s = shared_churn
    for c, var in up_s.items():
        beta = inp.churn_price(SHARED_TIER, c)
        terms[var] = -beta
        terms[down_s[c]] = -beta
    model.set_objective(terms, maximize=True)
