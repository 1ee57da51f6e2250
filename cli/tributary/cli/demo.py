"""``tributary demo``: the command only. The study it runs is ``tributary.testbed.demo``,
which ships with the testbed (a source checkout), not with the ``tributary`` wheel; the
import waits until the command runs so the rest of the CLI works without the testbed."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

console = Console(emoji=False)  # what the hub and others wrote is data, not markup


def demo(
    kind: Annotated[str, typer.Argument(help="validation (one study run per case) or "
                                             "training (a federated training study).")
                    ] = "validation",
    report: Annotated[Path | None, typer.Option(help="training: write the JSON report here."
                                                )] = None,
    rounds: Annotated[int, typer.Option(help="training: rounds of the study.")] = 4,
    cases: Annotated[str, typer.Option(help="Cases per spoke, comma-separated.")] = "12,10,8",
    hub_port: int = 8000,
    wait: Annotated[bool, typer.Option(help="Keep the federation running afterwards so the "
                                            "dashboard can be explored.")] = True,
    workdir: Annotated[Path | None, typer.Option(help="Where the demo keeps its files.")] = None,
    containers: Annotated[bool, typer.Option(help=(
        "Run broker, registry, hub and spokes as the containers of docker-compose.yml "
        "instead of processes (at most three spokes)."))] = False,
    broker_port: Annotated[int, typer.Option(help="With --containers: the broker's port.")
                           ] = 61613,
    registry_port: Annotated[int, typer.Option(help="With --containers: the registry's port.")
                             ] = 5000,
    hosts: Annotated[bool, typer.Option(help=(
        "Put each party on a host of its own (Linux network namespaces, needs root): "
        "broker, registry and hub on the hub side, each spoke allowed only outbound "
        "connections to the hub side's published ports. Removed afterwards."))] = False,
    podman: Annotated[bool, typer.Option(help=(
        "Run the last spoke's cases on Podman (through its Docker-compatible socket, "
        "started here) instead of the Docker engine."))] = False,
) -> None:
    """Run a whole federation here: services, hub, three spokes, one study, results."""
    if kind == "training":
        _training(workdir, report, wait, rounds)
        return
    if kind != "validation":
        console.print(f"[red]No demo {escape(repr(kind))}: validation or training.[/]")
        raise typer.Exit(2)
    try:
        from tributary.testbed.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name not in ("tributary.testbed", "tributary.testbed.demo"):
            raise
        console.print("[red]The demo needs a source checkout:[/] it runs the federation of "
                      "tributary-testbed, which is not installed here. Clone the repository "
                      "and run `make demo` there.")
        raise typer.Exit(1) from None
    from tributary.services.settings import ServiceSettings

    if containers and podman:
        console.print("[red]--podman runs with the process federation, not --containers.[/]")
        raise typer.Exit(2)
    if hosts and containers:
        console.print("[red]--hosts and --containers do not go together.[/]")
        raise typer.Exit(2)
    if hosts:
        from tributary.testbed.hosts import available

        if (why := available()) is not None:
            console.print(f"[red]--hosts cannot run here:[/] {escape(str(why))}")
            raise typer.Exit(1)
    counts = [int(c) for c in cases.split(",") if c.strip()]
    stop_on_signals()
    compose = (ServiceSettings(broker_port=broker_port, registry_port=registry_port)
               if containers else None)
    run_demo(counts, hub_port=hub_port, wait=wait, workdir=workdir, console=console,
             containers=compose, hosts=hosts, podman=podman)


def _training(workdir: Path | None, report: Path | None, wait: bool, rounds: int) -> None:
    try:
        from tributary.testbed.training_demo import main
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("tributary.testbed"):
            raise
        console.print("[red]The training demo needs a source checkout (tributary-testbed).[/]")
        raise typer.Exit(1) from None
    stop_on_signals()
    result = main(workdir, report, wait, rounds, say=console.print)
    if result["state"] != "finished":
        raise typer.Exit(1)


def _interrupt(signum: int, _frame: object) -> None:
    for other in (signal.SIGTERM, signal.SIGHUP):  # once: a second one must not cut the
        signal.signal(other, signal.SIG_IGN)       # stopping short and leave orphans
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """SIGTERM (a service manager, ``kill``) and SIGHUP (the terminal closing) stop the demo
    the way Ctrl-C does: the hub, the spokes and the demo's broker are stopped, not left
    running as orphans (Python's default for SIGTERM ends the process on the spot)."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
