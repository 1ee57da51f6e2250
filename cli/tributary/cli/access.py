"""``tributary access``: data access requests. A coordinator files one (with the ethics
approval and the DPIA), a committee member approves it with conditions or refuses it, the
requester may withdraw it; ``show`` and ``list`` read them as the hub's API does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, hub_client

app = typer.Typer(help="Data access requests and the data access committee's decisions.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup


def _show(request: dict[str, Any]) -> None:
    table = Table(show_header=False, title=escape(f"{request['id']}: {request['title']}"),
                  title_justify="left")
    table.add_column(overflow="fold")
    table.add_column(overflow="fold")  # digests wrapped whole, never cut with "…"
    for label, value in (
            ("state", request["state"]), ("requested by", request["requested_by"]),
            ("purpose", request["purpose"]), ("spokes", ", ".join(request["spokes"])),
            ("attributes", ", ".join(request["attributes"]) or "none"),
            ("kinds", ", ".join(request["study_kinds"])), ("k", str(request["k"])),
            ("ε", str(request["epsilon"])),
            ("conditions", json.dumps(request["conditions"]) if request["conditions"]
             else "none"),
            ("refusal", request["refusal_reason"] or ""),
            ("ε spent", f"{request['epsilon_spent']:g}"),
            ("attachments", ", ".join(f"{a['kind']} {a['digest']}"
                                      for a in request["attachments"])),
            ("votes", "; ".join(f"{v['member']} {v['decision']}" for v in request["votes"])),
            ("experiments", ", ".join(request["experiments"]) or "none"),
            ("training studies", ", ".join(request["training_studies"]) or "none")):
        table.add_row(escape(label), escape(value))
    console.print(table)


@app.command("request")
def file_request(
    title: Annotated[str, typer.Option(help="What the study is.")],
    purpose: Annotated[str, typer.Option(help="What it is for, and why these data.")],
    spoke: Annotated[list[str], typer.Option(help="A spoke (repeatable).")],
    kind: Annotated[list[str], typer.Option(help="validation or training (repeatable).")],
    ethics: Annotated[Path, typer.Option(exists=True, dir_okay=False,
                                         help="The ethics approval (PDF, PNG or JPEG).")],
    dpia: Annotated[Path, typer.Option(exists=True, dir_okay=False,
                                       help="The DPIA (PDF, PNG or JPEG).")],
    hub: HubOption,
    token: TokenOption,
    attribute: Annotated[list[str] | None, typer.Option(help="An attribute (repeatable).")
                         ] = None,
    k: Annotated[int | None, typer.Option(help="The k the studies need.")] = None,
    epsilon: Annotated[float | None, typer.Option(help="Total ε for training.")] = None,
    hub_ca: HubCaOption = None,
) -> None:
    """File a request for the data access committee."""
    data: dict[str, Any] = {"title": title, "purpose": purpose, "spokes": spoke,
                            "study_kinds": kind, "attributes": attribute or []}
    if k is not None:
        data["k"] = str(k)
    if epsilon is not None:
        data["epsilon"] = str(epsilon)
    with hub_client(hub, token, hub_ca) as client, ethics.open("rb") as e, dpia.open("rb") as d:
        filed = check(client.post("/api/access-requests", data=data, files={
            "ethics": (ethics.name, e), "dpia": (dpia.name, d)}), "access request")
    _show(filed)


@app.command("list")
def list_requests(hub: HubOption, token: TokenOption, hub_ca: HubCaOption = None) -> None:
    """The requests you may see (the committee and administrators: all of them)."""
    with hub_client(hub, token, hub_ca) as client:
        rows = check(client.get("/api/access-requests"), "list")
    table = Table("id", "state", "title", "requested by", "spokes")
    for r in rows:
        table.add_row(*(escape(v) for v in (r["id"], r["state"], r["title"], r["requested_by"],
                                            ", ".join(r["spokes"]))))
    console.print(table)


@app.command("show")
def show(request_id: Annotated[str, typer.Argument(help="ar-...")], hub: HubOption,
         token: TokenOption, as_json: Annotated[bool, typer.Option("--json")] = False,
         hub_ca: HubCaOption = None) -> None:
    """One request: its state, conditions, votes and the studies bound to it."""
    with hub_client(hub, token, hub_ca) as client:
        found = check(client.get(f"/api/access-requests/{request_id}"), "show")
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    else:
        _show(found)


@app.command("approve")
def approve(
    request_id: Annotated[str, typer.Argument(help="ar-...")],
    hub: HubOption,
    token: TokenOption,
    spoke: Annotated[list[str] | None, typer.Option(help="Allowed spoke (repeatable; "
                                                         "default: as requested).")] = None,
    attribute: Annotated[list[str] | None, typer.Option(
        help="Allowed attribute (repeatable; default: as requested).")] = None,
    kind: Annotated[list[str] | None, typer.Option(help="Allowed kind (repeatable).")] = None,
    min_k: Annotated[int | None, typer.Option(help="Smallest k allowed.")] = None,
    epsilon_budget: Annotated[float | None, typer.Option(help="Total ε budget.")] = None,
    expires: Annotated[str | None, typer.Option(help="Expiry, ISO 8601 with zone.")] = None,
    reason: Annotated[str, typer.Option(help="Remarks for the record.")] = "",
    hub_ca: HubCaOption = None,
) -> None:
    """Approve with conditions (as a committee member)."""
    body: dict[str, Any] = {"decision": "approve", "reason": reason, "spokes": spoke,
                            "attributes": attribute, "study_kinds": kind, "min_k": min_k,
                            "epsilon_budget": epsilon_budget, "expires_at": expires}
    with hub_client(hub, token, hub_ca) as client:
        _show(check(client.post(f"/api/access-requests/{request_id}/decision",
                                json={k: v for k, v in body.items() if v is not None}),
                    "decision"))


@app.command("refuse")
def refuse(request_id: Annotated[str, typer.Argument(help="ar-...")],
           reason: Annotated[str, typer.Option(help="Why.")], hub: HubOption,
           token: TokenOption, hub_ca: HubCaOption = None) -> None:
    """Refuse with a reason (as a committee member)."""
    with hub_client(hub, token, hub_ca) as client:
        _show(check(client.post(f"/api/access-requests/{request_id}/decision",
                                json={"decision": "refuse", "reason": reason}), "decision"))


@app.command("withdraw")
def withdraw(request_id: Annotated[str, typer.Argument(help="ar-...")], hub: HubOption,
             token: TokenOption,
             reason: Annotated[str, typer.Option(help="Why.")] = "withdrawn by the requester",
             hub_ca: HubCaOption = None) -> None:
    """Withdraw your own request: nothing more launches under it."""
    with hub_client(hub, token, hub_ca) as client:
        _show(check(client.post(f"/api/access-requests/{request_id}/withdraw",
                                json={"reason": reason}), "withdrawal"))
