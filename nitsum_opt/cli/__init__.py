"""The ``nitsum`` command line.

Each command group lives in its own module that adds its commands to :data:`app`; importing the module
registers them. Commands that need the runtime (``nitsum profile``) come from ``nitsum_runtime`` through the
``nitsum.cli`` entry-point group, so that ``nitsum_opt`` never imports ``nitsum_runtime``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from nitsum_opt.cli.app import app, console

# Command modules: importing them registers their commands on `app`.
from nitsum_opt.cli import bench_cmd  # noqa: F401  isort: skip
from nitsum_opt.cli import calibrate_cmd  # noqa: F401  isort: skip
from nitsum_opt.cli import models_cmd  # noqa: F401  isort: skip
from nitsum_opt.cli import plan_cmd  # noqa: F401  isort: skip
from nitsum_opt.cli import sim_cmd  # noqa: F401  isort: skip
from nitsum_opt.cli import trace_cmd  # noqa: F401  isort: skip


def _load_plugins() -> None:
    """Register commands that other installed packages (the runtime) provide via ``nitsum.cli`` entry points."""
    for ep in entry_points(group="nitsum.cli"):
        register = ep.load()
        register(app)


def main() -> None:
    """Entry point of the ``nitsum`` script."""
    _load_plugins()
    app()


__all__ = ["app", "console", "main"]
