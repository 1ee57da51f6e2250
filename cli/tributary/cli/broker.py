"""``tributary broker``: the broker's mutual TLS and per-spoke authorization.

Heavy imports stay inside the commands so ``tributary --help`` remains fast."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tributary.cli.hub_client import HubCaOption, check, hub_client

if TYPE_CHECKING:
    from tributary.services.broker_security import BrokerSecurityBundle

app = typer.Typer(help="Broker security: mutual TLS and per-spoke authorization for ActiveMQ.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup

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
    edge: Annotated[list[str] | None, typer.Option(
        "--edge", help="An edge broker near some spokes, NAME=HOST:PORT (repeatable).")] = None,
    edge_spoke: Annotated[list[str] | None, typer.Option(
        "--edge-spoke", help="Attach a spoke to an edge broker, NAME=SPOKE (repeatable).")
    ] = None,
    bridge_port: Annotated[int, typer.Option(
        help="Port of the hub broker where edge brokers' bridges connect.")] = 61617,
    bridge_host: Annotated[str | None, typer.Option(
        help="Name or address edge brokers dial for the hub broker (default: --host).")
    ] = None,
    network: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False,
        help="A network.json describing the edges instead of --edge/--edge-spoke.")] = None,
    federation: Annotated[str | None, typer.Option(
        help="The queue namespace to open: the hub's broker_federation and the spokes' "
             "\\[broker] federation (default: as --out was written for, else tributary).")
    ] = None,
) -> None:
    """Write the broker configuration: mutual TLS and one identity per spoke.

    The authorization map confines each spoke to its own queues and the hub's, of one
    federation.
    With --edge (or --network) it also writes edge brokers under edges/NAME/, each bridged
    to this hub broker (store-and-forward)."""
    from pydantic import ValidationError

    from tributary.services.broker_network import generate_network, network_from_options
    from tributary.services.broker_security import generate_broker_config

    spokes = list(spoke or [])
    if hub_url:
        spokes += registered_spokes(hub_url, token, hub_ca)
    try:
        spec = network_from_options(edge or [], edge_spoke or [], bridge_host, bridge_port,
                                    network)
        if spec is None and not spokes:
            console.print("[red]no spokes: pass --hub-url or --spoke[/]")
            raise typer.Exit(2)
        if spec is None:
            bundle = generate_broker_config(out, hub_identity=hub_identity, spoke_ids=spokes,
                                            host=host, stomp_ssl_port=port,
                                            server_names=server_name or [], rotate=rotate,
                                            federation=federation)
            edges: dict[str, BrokerSecurityBundle] = {}
        else:
            bundle, edges = generate_network(out, spec, hub_identity=hub_identity,
                                             spoke_ids=spokes, host=host, stomp_ssl_port=port,
                                             server_names=server_name or [], rotate=rotate,
                                             federation=federation)
    except (ValueError, ValidationError) as exc:
        console.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from exc
    console.print(f"wrote {bundle.config_path} for {bundle.url} (federation "
                  f"{bundle.federation})", markup=False)
    for name, edge_bundle in edges.items():
        console.print(f"  edge broker [bold]{escape(name)}[/] at "
                      + escape(f"{edge_bundle.url} for "
                               f"{', '.join(edge_bundle.spokes) or 'no spokes yet'}: "
                               f"{edge_bundle.out_dir}"))
    for identity in [bundle.hub, *bundle.spokes.values()]:
        console.print(f"  identity [bold]{escape(identity.name)}[/]: "
                      f"{escape(str(identity.directory))}")
    console.print("Hand each identity folder to its owner only; keep the rest of "
                  f"{bundle.out_dir} private.", markup=False)


EdgeOption = Annotated[str | None, typer.Option(
    "--edge", help="The edge broker NAME of --out instead of the hub broker.")]


def _bundle(out: Path, edge: str | None) -> BrokerSecurityBundle:
    from tributary.services.broker_network import load_edge
    from tributary.services.broker_security import load_bundle

    hub = load_bundle(out)
    return hub if edge is None else load_edge(out, edge, hub.hub.name)


@app.command("start")
def start(out: OutDir, edge: EdgeOption = None) -> None:
    """Run ActiveMQ with the configuration in --out (state in its instance/ folder)."""
    from tributary.services.broker_security import start_broker

    bundle = _bundle(out, edge)
    console.print(f"activemq {start_broker(bundle)} at {bundle.url}", markup=False)


@app.command("stop")
def stop(out: OutDir, edge: EdgeOption = None) -> None:
    """Stop the broker started from --out."""
    from tributary.services.broker_security import stop_broker

    stopped = stop_broker(_bundle(out, edge))
    console.print("activemq stopped" if stopped else "activemq was not running")
