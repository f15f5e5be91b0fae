"""Backends by name. Nothing is probed at import; ``available_backends()`` asks each backend when called."""

from __future__ import annotations

from .base import SolverBackend, SolverOptions, SolverUnavailableError
from .ortools_backend import OrToolsBackend
from .pulp_backend import PulpBackend

BACKENDS: dict[str, type[SolverBackend]] = {
    OrToolsBackend.name: OrToolsBackend,
    PulpBackend.name: PulpBackend,
}


def backend_names() -> list[str]:
    """Every registered backend name, sorted."""
    return sorted(BACKENDS)


def available_backends() -> list[str]:
    """Registered backends whose packages are importable."""
    return [name for name in backend_names() if BACKENDS[name].available()]


def parse_solver_spec(spec: str) -> tuple[str, str | None]:
    """Split ``backend[/engine]`` (e.g. ``ortools/highs``) into its parts."""
    name, _, engine = spec.partition("/")
    return name.strip(), (engine.strip() or None)


def get_backend(spec: str, options: SolverOptions | None = None) -> SolverBackend:
    """A backend for ``backend[/engine]``; unknown or missing backends raise an error listing the valid ones."""
    name, engine = parse_solver_spec(spec)
    cls = BACKENDS.get(name)
    if cls is None:
        valid = ", ".join(f"{n} (engines: {'/'.join(BACKENDS[n].engines)})" for n in backend_names())
        raise ValueError(f"unknown solver {spec!r}; valid solvers: {valid}")
    if not cls.available():
        raise SolverUnavailableError(
            f"solver {name!r} is registered but its package is not installed; available: {available_backends()}"
        )
    return cls(engine=engine, options=options)
