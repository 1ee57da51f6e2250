"""``tributary services``: install and start the local infrastructure a federation needs.

The work is done by the ``tributary.services`` package; imported inside each command so
``tributary --help`` does not load it."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Local infrastructure: Docker engine, ActiveMQ broker, OCI "
                       "registry and the algorithm base image.", no_args_is_help=True)
console = Console()


def _report(name: str, state: str) -> None:
    console.print(f"[bold]{name:<11}[/] {state}")


@app.command("up")
def up() -> None:
    """Install what is missing and start every service (idempotent)."""
    from tributary.services import manager

    manager.up(report=_report)


@app.command("down")
def down() -> None:
    """Stop the services this project started."""
    from tributary.services import manager

    manager.down(report=_report)


@app.command("status")
def status() -> None:
    """Show which services are running."""
    from tributary.services import manager

    table = Table("service", "state", "detail")
    rows = manager.status()
    for row in rows:
        table.add_row(row.name, "[green]up[/]" if row.running else "[red]down[/]", row.detail)
    console.print(table)
    if not all(r.running for r in rows):
        raise typer.Exit(1)
