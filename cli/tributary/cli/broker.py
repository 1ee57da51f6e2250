"""``tributary broker``: the broker's mutual TLS and per-spoke authorization.

Heavy imports stay inside the commands so ``tributary --help`` remains fast."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tributary.cli.hub_client import HubCaOption, check, hub_client

app = typer.Typer(help="Broker security: mutual TLS and per-spoke authorization for ActiveMQ.",
                  no_args_is_help=True)
console = Console()

OutDir = Annotated[Path, typer.Option("--out", "-o", file_okay=False,
                                      help="Folder for the configuration, CA and identities.")]


def registered_spokes(hub_url: str, token: str | None, ca_file: Path | None = None,
                      timeout: float = 10.0) -> list[str]:
    """The ids of the spokes registered at the hub (``GET /api/spokes``); exits with the
    reason when the hub cannot be reached or refuses."""
    with hub_client(hub_url, token, ca_file, timeout=timeout) as client:
        spokes = check(client.get("/api/spokes"), "listing the spokes")
    return [str(spoke["id"]) for spoke in spokes]


@app.command("config")
def config(
    out: OutDir,
    hub_url: Annotated[str | None, typer.Option(
        help="Read the registered spokes from this hub's REST API.")] = None,
    token: Annotated[str | None, typer.Option(
        envvar=["TRIBUTARY_HUB_TOKEN", "TRIBUTARY_TOKEN"], show_default=False,
        help="Bearer token for --hub-url (POST /api/auth/token; default: TRIBUTARY_HUB_TOKEN, "
             "else TRIBUTARY_TOKEN as for the other hub commands).")] = None,
    hub_ca: HubCaOption = None,
    spoke: Annotated[list[str] | None, typer.Option(
        "--spoke", help="A spoke id (repeatable); added to those from --hub-url.")] = None,
    hub_identity: Annotated[str, typer.Option(help="The hub's identity on the broker.")] = "hub",
    host: Annotated[str, typer.Option(help="Address the broker listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the stomp+ssl connector.")] = 61614,
    server_name: Annotated[list[str] | None, typer.Option(
        "--server-name", help="Another DNS name or address for the broker's certificate "
                              "(repeatable).")] = None,
    rotate: Annotated[bool, typer.Option(
        help="Replace the CA and every certificate.")] = False,
) -> None:
    """Write the broker configuration: mutual TLS and one identity per spoke.

    The authorization map confines each spoke to its own queue and the results queue."""
    from tributary.services.broker_security import generate_broker_config

    spokes = list(spoke or [])
    if hub_url:
        spokes += registered_spokes(hub_url, token, hub_ca)
    if not spokes:
        console.print("[red]no spokes: pass --hub-url or --spoke[/]")
        raise typer.Exit(2)
    try:
        bundle = generate_broker_config(out, hub_identity=hub_identity, spoke_ids=spokes,
                                        host=host, stomp_ssl_port=port,
                                        server_names=server_name or [], rotate=rotate)
    except ValueError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    console.print(f"wrote {bundle.config_path} for {bundle.url}")
    for identity in [bundle.hub, *bundle.spokes.values()]:
        console.print(f"  identity [bold]{identity.name}[/]: {identity.directory}")
    console.print("Hand each identity folder to its owner only; keep the rest of "
                  f"{bundle.out_dir} private.")


@app.command("start")
def start(out: OutDir) -> None:
    """Run ActiveMQ with the configuration in --out (state in its instance/ folder)."""
    from tributary.services.broker_security import load_bundle, start_broker

    bundle = load_bundle(out)
    console.print(f"activemq {start_broker(bundle)} at {bundle.url}")


@app.command("stop")
def stop(out: OutDir) -> None:
    """Stop the broker started from --out."""
    from tributary.services.broker_security import load_bundle, stop_broker

    stopped = stop_broker(load_bundle(out))
    console.print("activemq stopped" if stopped else "activemq was not running")
