"""The ``tokensieve`` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from tokensieve.core.registry import get_method, list_methods

app = typer.Typer(help="Training-free visual token reduction for vision-language models.",
                  no_args_is_help=True, add_completion=False)


@app.command("list")
def list_command() -> None:
    """Print every method: where it acts, the signals it needs and its paper."""
    table = Table(title="tokensieve methods")
    for col in ("name", "acts", "kind", "signals needed", "optional", "paper"):
        table.add_column(col, overflow="fold")
    for name in list_methods():
        spec = get_method(name)
        table.add_row(spec.name, spec.stage, spec.kind, ", ".join(spec.signals) or "-",
                      ", ".join(spec.optional_signals) or "-", spec.paper)
    Console(width=200).print(table)


@app.callback()
def main() -> None:
    """tokensieve: prune, merge and cluster visual tokens of VLMs, measured under one protocol."""


if __name__ == "__main__":
    app()
