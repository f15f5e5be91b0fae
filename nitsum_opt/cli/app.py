"""The typer application and the shared rich console; command modules import both from here."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="nitsum",
    help="Plan, simulate and profile multi-tier LLM serving with adaptive tensor parallelism.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)
