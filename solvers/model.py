"""A small, solver-independent representation of a mixed-integer linear program.

Formulations build a :class:`LinearModel`; every backend translates it into its own API. The model is plain
data (names, bounds, coefficients), so it can be exported to LP/MPS, hashed and compared in golden tests.
Nothing here knows about LLMs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Variable:
    """A decision variable; ``index`` is its position in :attr:`LinearModel.variables`."""

    index: int
    name: str
    lb: float
    ub: float
    is_integer: bool


@dataclass(frozen=True, slots=True)
class Constraint:
    """``lb <= Σ coef·x <= ub`` (either side may be infinite)."""

    name: str
    terms: tuple[tuple[int, float], ...]
    lb: float
    ub: float


class ModelError(ValueError):
    """A model that no backend should be given: duplicate names, NaN coefficients, empty bounds."""


@dataclass
class LinearModel:
    """A MILP: variables, named linear constraints and a linear objective.

    Build it with :meth:`add_variable`, :meth:`add_constraint` and :meth:`set_objective`; names must be unique
    (solvers and exports refer to them).
    """

    name: str = "model"
    variables: list[Variable] = field(default_factory=list)
    constraints: list[Constraint] = field(default_factory=list)
    objective: dict[int, float] = field(default_factory=dict)
    objective_offset: float = 0.0
    maximize: bool = True
    _names: set[str] = field(default_factory=set, repr=False)

    def add_variable(self, name: str, lb: float = 0.0, ub: float = math.inf, integer: bool = False) -> Variable:
        """Add a variable with bounds ``[lb, ub]``; ``integer`` makes it integral."""
        self._claim(name)
        if math.isnan(lb) or math.isnan(ub) or lb > ub:
            raise ModelError(f"variable {name!r} has empty or NaN bounds [{lb}, {ub}]")
        var = Variable(len(self.variables), name, float(lb), float(ub), integer)
        self.variables.append(var)
        return var

    def add_constraint(
        self,
        name: str,
        terms: Mapping[Variable, float],
        lb: float = -math.inf,
        ub: float = math.inf,
    ) -> Constraint:
        """Add ``lb <= Σ terms[x]·x <= ub``; zero coefficients are dropped."""
        self._claim(name)
        if math.isnan(lb) or math.isnan(ub) or lb > ub:
            raise ModelError(f"constraint {name!r} has empty or NaN bounds [{lb}, {ub}]")
        clean = tuple((v.index, float(c)) for v, c in terms.items() if c != 0)
        for _, coef in clean:
            if not math.isfinite(coef):
                raise ModelError(f"constraint {name!r} has a non-finite coefficient {coef}")
        con = Constraint(name, clean, float(lb), float(ub))
        self.constraints.append(con)
        return con

    def set_objective(self, terms: Mapping[Variable, float], maximize: bool = True, offset: float = 0.0) -> None:
        """Set the objective ``offset + Σ terms[x]·x`` and its sense."""
        for var, coef in terms.items():
            if not math.isfinite(coef):
                raise ModelError(f"objective coefficient of {var.name!r} is {coef}")
        self.objective = {v.index: float(c) for v, c in terms.items() if c != 0}
        self.objective_offset = float(offset)
        self.maximize = maximize

    def variable(self, name: str) -> Variable:
        """The variable called ``name``."""
        for var in self.variables:
            if var.name == name:
                return var
        raise KeyError(f"model {self.name!r} has no variable {name!r}")

    def evaluate_objective(self, values: Mapping[str, float]) -> float:
        """Objective at ``values`` (by variable name)."""
        return self.objective_offset + sum(coef * values[self.variables[i].name] for i, coef in self.objective.items())

    def violations(self, values: Mapping[str, float], tol: float = 1e-6) -> list[str]:
        """Bounds, integrality and constraints that ``values`` violate by more than ``tol``."""
        out: list[str] = []
        for var in self.variables:
            x = values[var.name]
            if x < var.lb - tol or x > var.ub + tol:
                out.append(f"{var.name}={x} outside [{var.lb}, {var.ub}]")
            if var.is_integer and abs(x - round(x)) > tol:
                out.append(f"{var.name}={x} is not integral")
        for con in self.constraints:
            act = sum(coef * values[self.variables[i].name] for i, coef in con.terms)
            if act < con.lb - tol * max(1.0, abs(con.lb)) or act > con.ub + tol * max(1.0, abs(con.ub)):
                out.append(f"{con.name}: activity {act} outside [{con.lb}, {con.ub}]")
        return out

    @property
    def num_integer(self) -> int:
        """Number of integer variables."""
        return sum(v.is_integer for v in self.variables)

    def _claim(self, name: str) -> None:
        if not name or len(name.split()) != 1 or name.split()[0] != name:
            raise ModelError(f"name {name!r} must be non-empty and contain no whitespace")
        if name in self._names:
            raise ModelError(f"name {name!r} is used twice in model {self.name!r}")
        self._names.add(name)
