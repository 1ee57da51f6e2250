"""``tributary publisher``: an administrator registers a publisher's public key at the hub,
after which the hub accepts that publisher's release signatures (``POST /api/publishers``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, fail, hub_client

app = typer.Typer(help="Algorithm publishers known to the hub.", no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup


@app.command("register")
def register(
    name: Annotated[str, typer.Argument(help="The publisher's name, as pages will show it.")],
    key: Annotated[Path, typer.Option(
        exists=True, dir_okay=False,
        help="The publisher's public key (KEY.pub of `tributary algorithm keygen KEY`).")],
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """Register a publisher key (administrators); prints its key id."""
    pem = key.read_text(errors="replace")
    if "PRIVATE KEY" in pem:
        fail(f"{key} is a private key; register its public half ({key}.pub) and keep "
             "this file to yourself")
    with hub_client(hub, token, hub_ca) as client:
        created = check(client.post("/api/publishers",
                                    json={"name": name, "public_key_pem": pem}),
                        "publisher registration")
    console.print(f"registered publisher [bold]{escape(created['name'])}[/] with key id "
                  f"{escape(created['keyid'])}")


@app.command("list")
def list_(
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """The publishers whose release signatures the hub accepts."""
    from rich.table import Column, Table

    with hub_client(hub, token, hub_ca) as client:
        publishers = check(client.get("/api/publishers"), "listing")
    table = Table(*(Column(h, overflow="fold") for h in ("name", "key id", "registered")))
    for publisher in publishers:
        table.add_row(escape(publisher["name"]), escape(publisher["keyid"]),
                      escape(publisher["created_at"]))
    console.print(table)
