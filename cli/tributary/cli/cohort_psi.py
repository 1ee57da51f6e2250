"""``tributary cohort psi``: ask spokes to intersect their patients privately (a count
only, or linking pseudonyms kept at each spoke), and show each spoke's state and the
suppressed result."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, hub_client

app = typer.Typer(help="Private set intersection between spokes, through the hub as relay.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup


def _show(run: dict[str, Any]) -> None:
    table = Table("spoke", "role", "state", "reason",
                  title=escape(f"PSI {run['id']} ({run['mode']}): {run['purpose']}"),
                  title_justify="left")
    for spoke in run["spokes"]:
        table.add_row(escape(spoke["spoke_id"]), "leader" if spoke["leader"] else "partner",
                      escape(spoke["state"]), escape(spoke["reason"] or ""))
    table.add_row("[bold]result[/]", "", escape(run["state"]),
                  f"[bold]{escape(run['result_text'])}[/]")
    console.print(table)
    console.print(f"relayed: {run['relayed_messages']} message(s), "
                  f"{run['relayed_bytes']} characters", markup=False)


@app.command("request")
def request(
    spoke: Annotated[list[str], typer.Option(help="A spoke (repeatable); the first leads.")],
    purpose: Annotated[str, typer.Option(help="Why: shown to each site's data steward.")],
    hub: HubOption,
    token: TokenOption,
    mode: Annotated[str, typer.Option(help="cardinality (a count) or intersection (linking "
                                           "pseudonyms at each spoke).")] = "cardinality",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the result.")] = 0,
    access_request: Annotated[str | None, typer.Option(
        help="The approved data access request it runs under (one allowing linkage).")
    ] = None,
    hub_ca: HubCaOption = None,
) -> None:
    """Ask the spokes; each site's steward approves or refuses it."""
    if mode not in ("cardinality", "intersection"):
        raise typer.BadParameter("cardinality or intersection", param_hint="--mode")
    with hub_client(hub, token, hub_ca, timeout=30) as client:
        run = check(client.post("/api/psi", json={
            "mode": mode, "spoke_ids": spoke, "purpose": purpose,
            "access_request_id": access_request}), "PSI")
        deadline = time.monotonic() + wait
        while run["state"] in ("requested", "running") and time.monotonic() < deadline:
            time.sleep(0.5)
            run = check(client.get(f"/api/psi/{run['id']}"), "PSI")
    _show(run)


@app.command("show")
def show(psi_id: Annotated[str, typer.Argument(help="The PSI's id (psi-...).")],
         hub: HubOption, token: TokenOption, hub_ca: HubCaOption = None) -> None:
    """Each spoke's state and the result."""
    with hub_client(hub, token, hub_ca, timeout=30) as client:
        _show(check(client.get(f"/api/psi/{psi_id}"), "PSI"))


@app.command("list")
def list_(hub: HubOption, token: TokenOption, hub_ca: HubCaOption = None) -> None:
    """The PSIs asked, newest first."""
    with hub_client(hub, token, hub_ca, timeout=30) as client:
        runs = check(client.get("/api/psi"), "PSI")
    table = Table("id", "mode", "spokes", "state", "result")
    for run in runs:
        table.add_row(*(escape(v) for v in (
            run["id"], run["mode"], ", ".join(s["spoke_id"] for s in run["spokes"]),
            run["state"], run["result_text"])))
    console.print(table)
