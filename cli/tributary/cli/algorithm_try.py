"""``tributary algorithm try`` and ``tributary algorithm spokes``: run your own version,
reviewed or not, on the hub's sandbox spokes (synthetic data only) and watch it; and see
which spokes will run a version, and why the others will not."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, hub_client

console = Console(emoji=False)  # what the hub and others wrote is data, not markup


def _json(value: str | None, what: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint=what) from None


def try_version(
    algorithm_id: Annotated[int, typer.Argument(help="Your version's id (publish prints it).")],
    arguments: Annotated[str | None, typer.Option(help="Algorithm arguments, JSON.")] = None,
    cohort: Annotated[str | None, typer.Option(help="Cohort criteria, JSON.")] = None,
    spoke: Annotated[list[str] | None, typer.Option(
        help="A sandbox spoke (repeatable; default: every sandbox spoke).")] = None,
    watch_it: Annotated[bool, typer.Option("--watch/--no-watch",
                                           help="Watch it until done.")] = True,
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """Run your own version on the sandbox spokes: synthetic data only, no review needed,
    so you can iterate on digests. Exit 1 if any case failed or a spoke refused, with each
    reason and log tail. Real spokes never run an unreviewed version."""
    body: dict[str, Any] = {"spoke_ids": spoke or []}
    if arguments is not None:
        body["arguments"] = _json(arguments, "--arguments")
    if cohort is not None:
        body["cohort"] = _json(cohort, "--cohort")
    with hub_client(hub, token, hub_ca) as client:
        experiment = check(client.post(f"/api/algorithms/{algorithm_id}/try", json=body),
                           "sandbox run")
    targets = ", ".join(t["spoke_id"] for t in experiment["targets"])
    console.print(f"sandbox study [bold]{escape(experiment['id'])}[/] launched to "
                  f"{escape(targets)} (synthetic data only)")
    console.print(f"  page {hub.rstrip('/')}/experiments/{experiment['id']}", soft_wrap=True,
                  markup=False)
    typer.echo(experiment["id"])
    if watch_it:
        from tributary.cli.study import watch

        watch(experiment["id"], hub, token, hub_ca)


def spokes(
    algorithm_id: Annotated[int, typer.Argument(help="The version's id.")],
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """Which spokes will run this version and, for the others, why not (from the publisher
    keys each spoke reports trusting). Exit 1 if no spoke with real data will run it."""
    from rich.table import Table

    with hub_client(hub, token, hub_ca) as client:
        verdicts = check(client.get(f"/api/algorithms/{algorithm_id}/trust"), "trust")
    table = Table("spoke", "runs it", "why")
    for v in verdicts:
        label = v["spoke_id"] + (" (sandbox)" if v["sandbox"] else "")
        table.add_row(escape(label), "[green]yes[/]" if v["runs"] else "[red]no[/]",
                      escape(v["reason"]))
    console.print(table)
    if not any(v["runs"] for v in verdicts if not v["sandbox"]):
        raise typer.Exit(1)
