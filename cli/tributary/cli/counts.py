"""``tributary counts``: ask the hub how many cases match a selection at each spoke, and
show the answers (per spoke, with suppressed small cells, and the total)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, hub_client

app = typer.Typer(help="Federated counts: how many cases match, per spoke and in total, "
                       "without any case leaving a site.", no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup

def _show(count: dict[str, Any]) -> None:
    table = Table("spoke", "state", "cases", title=escape(f"count {count['id']}: "
                                                      f"{count['selection']}"),
                  title_justify="left")
    for spoke in count["spokes"]:
        cases = (str(spoke["count"]) if spoke["count"] is not None
                 else f"fewer than {spoke['fewer_than']}" if spoke["fewer_than"]
                 else spoke["reason"] or "")
        table.add_row(escape(spoke["spoke_id"]), escape(spoke["state"]), escape(cases))
    table.add_row("[bold]total[/]", "complete" if count["complete"] else "waiting",
                  f"[bold]{escape(count['total_text'])}[/]"
                  + (f" (at most {count['total_at_most']})"
                     if count["total_at_most"] is not None and not count["total_is_exact"]
                     else ""))
    console.print(table)


@app.command("ask")
def ask(
    spoke: Annotated[list[str], typer.Option(help="A target spoke (repeatable).")],
    hub: HubOption,
    token: TokenOption,
    modality: Annotated[str | None, typer.Option(help="Cases with a series of this "
                                                      "modality.")] = "CT",
    wait: Annotated[float, typer.Option(help="Seconds to wait for every answer.")] = 60,
    hub_ca: HubCaOption = None,
) -> None:
    """Send a count to the spokes and show their answers as they arrive."""
    selection = {"modality": modality}
    with hub_client(hub, token, hub_ca, timeout=30) as client:
        count = check(client.post("/api/counts",
                                  json={"selection": selection, "spoke_ids": spoke}), "count")
        deadline = time.monotonic() + wait
        with console.status("waiting for the spokes' answers"):
            while not count["complete"] and time.monotonic() < deadline:
                time.sleep(0.5)
                count = check(client.get(f"/api/counts/{count['id']}"), "count")
    _show(count)


@app.command("show")
def show(
    count_id: Annotated[str, typer.Argument(help="The count's id (cnt-...).")],
    hub: HubOption,
    token: TokenOption,
    hub_ca: HubCaOption = None,
) -> None:
    """Show a count's answers and total."""
    with hub_client(hub, token, hub_ca, timeout=30) as client:
        count = check(client.get(f"/api/counts/{count_id}"), "count")
    _show(count)
