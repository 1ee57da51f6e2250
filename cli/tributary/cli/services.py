"""``tributary services``: install and start the local infrastructure a federation needs.

The work is done by the ``tributary.services`` package; imported inside each command so
``tributary --help`` does not load it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Local infrastructure: Docker engine, ActiveMQ broker, OCI "
                       "registry, S3 object store and the algorithm base image.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup


def _report(name: str, state: str) -> None:
    console.print(f"[bold]{escape(name):<11}[/] {escape(state)}")


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
        table.add_row(escape(row.name), "[green]up[/]" if row.running else "[red]down[/]",
                      escape(row.detail))
    console.print(table)
    if not all(r.running for r in rows):
        raise typer.Exit(1)


@app.command("podman")
def podman_up(
    rootless: Annotated[bool, typer.Option(help=(
        "Run it rootless, as an unprivileged system user of its own (created with a "
        "subordinate uid range if missing)."))] = False,
) -> None:
    """Install Podman if missing and start its Docker-compatible API service (idempotent),
    for spokes whose execution engine is podman, and for Slurm jobs."""
    from tributary.services import podman
    from tributary.services.system import ServiceError

    try:
        socket = podman.ensure_rootless() if rootless else podman.ensure_running()
    except ServiceError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from exc
    _report("podman", f"running at {socket}")
    if rootless:
        _report("", f"the algorithm's user appears as uid {podman.mapped_uid()}: set the "
                    "spoke's execution.algorithm_uid to it and runner.output_quota_mb to 0")


@app.command("slurm")
def slurm_up() -> None:
    """Install Slurm and munge if missing and start a one-machine cluster on loopback
    (slurmctld and slurmd, idempotent), for spokes whose execution engine is slurm."""
    from tributary.services import podman, slurm
    from tributary.services.system import ServiceError

    try:
        podman.ensure_running()
        conf = slurm.ensure_running()
    except ServiceError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from exc
    _report("slurm", f"running, SLURM_CONF={conf}")


@app.command("objectstore")
def objectstore_up(
    pki_dir: Annotated[Path | None, typer.Option(
        "--pki", file_okay=False,
        help="The federation PKI folder (`tributary pki issue --out`): the store's "
             "certificates come from its CA. Default: a CA of this host's services.")] = None,
    server_name: Annotated[list[str] | None, typer.Option(
        "--server-name", help="A name or address parties dial (repeatable).")] = None,
) -> None:
    """Start the S3 object store (SeaweedFS, TLS, one identity per party) on
    TRIBUTARY_HOST:TRIBUTARY_OBJECTSTORE_PORT, if it is not running (idempotent). Parties
    get their identities from `tributary pki issue --objectstore`."""
    from tributary.services import objectstore
    from tributary.services.settings import ServiceSettings
    from tributary.services.system import ServiceError

    settings = ServiceSettings()
    try:
        state = objectstore.ensure_running(settings, pki_dir / "pki" if pki_dir else None,
                                           server_name or [])
    except ServiceError as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from exc
    _report("objectstore", f"{state} at {objectstore.endpoint(settings)}")
