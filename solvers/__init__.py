"""MILP solver backends behind one contract (installed as ``nitsum_opt.solvers``); knows nothing of LLMs.

>>> from nitsum_opt.solvers import LinearModel, get_backend
>>> m = LinearModel("demo"); x = m.add_variable("x", 0, 10, integer=True)
>>> _ = m.add_constraint("cap", {x: 2.0}, ub=7); m.set_objective({x: 1.0})
>>> get_backend("ortools").solve(m).objective
3.0
"""

from .base import SolverBackend, SolveResult, SolverOptions, SolverUnavailableError, SolveStatus
from .export import to_lp, to_mps, write_model
from .model import Constraint, LinearModel, ModelError, Variable
from .registry import BACKENDS, available_backends, backend_names, get_backend, parse_solver_spec

__all__ = [
    "BACKENDS",
    "Constraint",
    "LinearModel",
    "ModelError",
    "SolveResult",
    "SolveStatus",
    "SolverBackend",
    "SolverOptions",
    "SolverUnavailableError",
    "Variable",
    "available_backends",
    "backend_names",
    "get_backend",
    "parse_solver_spec",
    "to_lp",
    "to_mps",
    "write_model",
]
