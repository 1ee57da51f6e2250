"""``tributary vertical``: create, list and show vertical training studies on a hub and read
their final model as the coordinator may see it, through its REST API
(``/api/vertical-studies``; docs/cohorts.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, hub_client

app = typer.Typer(help="Vertical training studies on a hub: create, list, show, model.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup


@app.command("create")
def create(
    file: Annotated[Path, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="JSON settings of the study (the fields of POST /api/vertical-studies).")],
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """Create a vertical study; prints its id. Both spokes' stewards approve it before it
    runs; a spoke refuses attributes outside its allowlist or a PSI it has not linked."""
    try:
        body: dict[str, Any] = json.loads(file.read_text())
    except ValueError as exc:
        raise typer.BadParameter(f"{file} is not JSON: {exc}", param_hint="--file") from None
    with hub_client(hub, token, hub_ca) as client:
        study = check(client.post("/api/vertical-studies", json=body), "creating the study")
    print(study["id"])


@app.command("list")
def list_studies(hub: HubOption = "http://127.0.0.1:8000", token: TokenOption = "",
                 hub_ca: HubCaOption = None,
                 as_json: Annotated[bool, typer.Option("--json", help="The API's JSON.")]
                 = False) -> None:
    """Every vertical study with its state and rounds done."""
    with hub_client(hub, token, hub_ca) as client:
        studies = check(client.get("/api/vertical-studies"), "listing the studies")
    if as_json:
        print(json.dumps(studies, indent=2))
        return
    table = Table(title="vertical studies")
    for column in ("study", "name", "state", "rounds", "features", "label", "last loss"):
        table.add_column(escape(column))
    for s in studies:
        table.add_row(escape(s["id"]), escape(s["name"]), escape(s["state"]),
                      f"{len(s['losses'])}/{s['hyperparameters']['rounds']}",
                      escape(s["features_spoke"]), escape(s["label_spoke"]),
                      f"{s['losses'][-1]:.4f}" if s["losses"] else "")
    console.print(table)


@app.command("show")
def show(study_id: Annotated[str, typer.Argument(help="The vertical study's id.")],
         hub: HubOption = "http://127.0.0.1:8000", token: TokenOption = "",
         hub_ca: HubCaOption = None) -> None:
    """The study (JSON): its parties' states, stage, the loss of every round."""
    with hub_client(hub, token, hub_ca) as client:
        print(json.dumps(check(client.get(f"/api/vertical-studies/{study_id}"),
                               "reading the study"), indent=2))


@app.command("model")
def model(study_id: Annotated[str, typer.Argument(help="The vertical study's id.")],
          hub: HubOption = "http://127.0.0.1:8000", token: TokenOption = "",
          hub_ca: HubCaOption = None) -> None:
    """The final model as the coordinator may see it (JSON): each spoke's coefficients
    only if the study released them."""
    with hub_client(hub, token, hub_ca) as client:
        print(json.dumps(check(client.get(f"/api/vertical-studies/{study_id}/model"),
                               "reading the model"), indent=2))
