"""``tributary algorithm list|show|review``: the registered versions and their reviews,
through the hub's REST API, so a reviewer need not open the dashboard (its forms do the
same)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, hub_client

console = Console(emoji=False)  # what the hub and others wrote is data, not markup


def _state(algorithm: dict[str, Any]) -> str:
    if algorithm.get("revoked_at"):
        return "revoked"
    return "approved" if algorithm.get("approval") else "pending review"


def list_versions(
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """Every registered algorithm version: id, name, version, state, publisher."""
    from rich.table import Table

    with hub_client(hub, token, hub_ca) as client:
        algorithms = check(client.get("/api/algorithms"), "listing")
    table = Table("id", "name", "version", "state", "publisher", "digest")
    for a in algorithms:
        table.add_row(str(a["id"]), escape(a["name"]), escape(a["version"]), _state(a),
                      escape(a.get("publisher") or "unsigned"), escape(a["digest"][:19]) + "…")
    console.print(table)


def show(
    algorithm_id: Annotated[int, typer.Argument(help="The version's id.")],
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """One version: image, publisher, state and every review."""
    with hub_client(hub, token, hub_ca) as client:
        a = check(client.get(f"/api/algorithms/{algorithm_id}"), "algorithm")
        reviews = check(client.get(f"/api/algorithms/{algorithm_id}/reviews"), "reviews")
    console.print(f"[bold]{escape(a['name'])} {escape(a['version'])}[/] (id {a['id']}): "
                  f"{_state(a)}")
    console.print(f"  image      {escape(a['repository'])}@{escape(a['digest'])}",
                  soft_wrap=True)
    console.print(f"  publisher  {escape(a.get('publisher') or 'unsigned')}")
    console.print(f"  aggregator {escape(a['aggregator'])}")
    console.print(f"  page       {hub.rstrip('/')}/algorithms/{a['id']}", soft_wrap=True,
                  markup=False)
    for review in reviews:
        comment = f": {review['comment']}" if review.get("comment") else ""
        console.print(escape(f"  review     {review['decision']} by {review['reviewer']} "
                             f"({review['organisation']}){comment}"), soft_wrap=True)
    if not reviews:
        console.print("  review     none yet")


def review(
    algorithm_id: Annotated[int, typer.Argument(help="The version's id (publish prints it).")],
    approve: Annotated[bool, typer.Option("--approve/--reject",
                                          help="Your decision.")],
    comment: Annotated[str, typer.Option(help="Why; shown beside your decision.")] = "",
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """Approve or reject a version (reviewers). Once the federation's review rule is met
    (by default two reviewers of two organisations) the hub signs its approval and the
    version can run."""
    decision = "approve" if approve else "reject"
    with hub_client(hub, token, hub_ca) as client:
        a = check(client.post(f"/api/algorithms/{algorithm_id}/reviews",
                              json={"decision": decision, "comment": comment}), "review")
    console.print(f"recorded: {escape(decision)} {escape(a['name'])} {escape(a['version'])} "
                  f"(id {a['id']}); now "
                  f"[bold]{_state(a)}[/]"
                  + (", the hub signed its approval" if a.get("approval") else ""))
