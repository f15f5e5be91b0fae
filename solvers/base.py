"""The contract every MILP backend implements, and the typed result it returns.

A backend has a ``name``, reports whether it is ``available()`` (no probing at import), ``build``s its native
model from a :class:`~nitsum_opt.solvers.model.LinearModel` and ``solve``s it. A solve never raises for a
model that is merely infeasible, unbounded or too slow: that is a :class:`SolveStatus` the caller handles.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from .model import LinearModel


class SolveStatus(StrEnum):
    """Outcome of a solve."""

    OPTIMAL = "optimal"
    """Proven optimal within the relative gap."""
    FEASIBLE = "feasible"
    """A feasible solution, not proven optimal (time limit reached)."""
    INFEASIBLE = "infeasible"
    """No solution exists."""
    UNBOUNDED = "unbounded"
    """The objective is unbounded."""
    NO_SOLUTION = "no_solution"
    """The limit was reached before any feasible solution was found."""
    ERROR = "error"
    """The solver failed; ``message`` says how."""

    @property
    def has_solution(self) -> bool:
        """True when ``values`` hold a feasible point."""
        return self in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)


class SolverOptions(BaseModel):
    """Limits and tolerances common to every backend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    time_limit_s: float = Field(default=10.0, gt=0)
    """Wall-clock limit of one solve, in seconds."""
    relative_gap: float = Field(default=1e-9, ge=0, le=1)
    """Stop when (bound − objective)/|objective| is below this."""
    absolute_gap: float = Field(default=1e-7, ge=0)
    """Stop when |bound − objective| is below this."""
    threads: int = Field(default=1, ge=1, le=256)
    """Solver threads (1 keeps runs deterministic)."""


class SolveResult(BaseModel):
    """What a backend returns for one solve."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: SolveStatus
    """Outcome; check ``status.has_solution`` before reading ``values``."""
    objective: float | None = None
    """Objective of the returned solution (None without one)."""
    bound: float | None = None
    """Best proven bound on the objective (None if the solver gives none)."""
    gap: float | None = None
    """Relative gap |bound − objective| / max(1, |objective|)."""
    solve_time_ms: float = Field(ge=0)
    """Wall time of build + solve."""
    values: dict[str, float] = Field(default_factory=dict)
    """Variable values by name (empty without a solution)."""
    backend: str
    """Backend and engine, e.g. ``ortools/scip``."""
    message: str = ""
    """Solver's own words when something went wrong."""


class SolverUnavailableError(RuntimeError):
    """The backend's package or engine is not installed."""


class SolverBackend(ABC):
    """Base class of every backend; subclasses set ``name`` and ``engines`` and implement the two hooks."""

    name: ClassVar[str]
    """Registry name, e.g. ``ortools``."""
    engines: ClassVar[tuple[str, ...]]
    """Underlying engines this backend can drive; the first is the default."""

    def __init__(self, engine: str | None = None, options: SolverOptions | None = None) -> None:
        self.engine = engine or self.engines[0]
        if self.engine not in self.engines:
            raise ValueError(f"backend {self.name!r} has no engine {self.engine!r}; choose one of {list(self.engines)}")
        self.options = options or SolverOptions()

    @property
    def label(self) -> str:
        """``<backend>/<engine>``, as recorded in plans."""
        return f"{self.name}/{self.engine}"

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether the backend's package (and at least its default engine) can be used."""

    @abstractmethod
    def build(self, model: LinearModel) -> Any:
        """Translate ``model`` into the backend's native model object."""

    @abstractmethod
    def _solve_native(self, native: Any, model: LinearModel) -> SolveResult:
        """Solve a native model; ``solve_time_ms`` is filled in by :meth:`solve`."""

    def solve(self, model: LinearModel) -> SolveResult:
        """Build and solve ``model``; the reported time includes the build."""
        start = time.perf_counter()
        try:
            native = self.build(model)
            result = self._solve_native(native, model)
        except SolverUnavailableError:
            raise
        except Exception as exc:  # a solver crash becomes a typed status, never a bare exception
            result = SolveResult(
                status=SolveStatus.ERROR, solve_time_ms=0.0, backend=self.label, message=f"{type(exc).__name__}: {exc}"
            )
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        return result.model_copy(update={"solve_time_ms": elapsed_ms})


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    """|bound − objective| / max(1, |objective|), or None when either is missing."""
    if objective is None or bound is None:
        return None
    return abs(bound - objective) / max(1.0, abs(objective))
