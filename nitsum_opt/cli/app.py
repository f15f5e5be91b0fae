"""The typer application and the shared rich console; command modules import both from here."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="nitsum",
    help="Plan, simulate and profile multi-tier LLM serving with adaptive tensor parallelism.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Wide enough for plan tables when the output is piped (rich falls back to 80 columns otherwise).
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
