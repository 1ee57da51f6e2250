"""``tributary spoke status``: what a spoke holds and does, read from its work folder, for
the site's IT: is the agent running, what is queued, running or held, what waits to be
sent to the hub (and since when: a broker outage shows here), what the catalog holds, and
the last entries of its audit log. Reads only; safe while the agent runs."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tributary.spoke.commands.data import ConfigOption, load_config

console = Console(emoji=False)  # outside text is printed as data, not markup
CASE_STATES = ("queued", "running", "held", "done")


def status(
    config: ConfigOption,
    recent: Annotated[int, typer.Option(help="How many audit entries to show.", min=0)] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document.")] = False,
) -> None:
    """Show the agent's state, its experiments and cases, the outbox and the catalog."""
    from tributary.protocol.auditlog import read_entries
    from tributary.spoke.ingest import catalog_path, open_catalog
    from tributary.spoke.journal import Journal, agent_pid

    settings = load_config(config)
    work = settings.work_dir
    pid = agent_pid(work)
    journal = None
    if (work / "journal.db").exists():
        store = Journal(work / "journal.db")
        journal = store.status()
        store.close()
    catalog = None
    if catalog_path(work).exists():
        with open_catalog(settings) as opened:
            catalog = opened.counts()
    log = work / "audit.jsonl"
    entries = [e for _, e in read_entries(log) if e] if log.exists() else []
    document: dict[str, Any] = {
        "spoke_id": settings.spoke_id, "agent": {"running": pid is not None, "pid": pid},
        "journal": asdict(journal) if journal else None, "catalog": catalog,
        "recent": entries[-recent:] if recent else []}
    if as_json:
        typer.echo(json.dumps(document, indent=1, default=str))
        return
    _show(document)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"


def _show(document: dict[str, Any]) -> None:
    agent = document["agent"]
    console.print(f"[bold]spoke {escape(document['spoke_id'])}[/]: agent "
                  + (f"[green]running[/] (pid {agent['pid']})" if agent["running"]
                     else "[yellow]not running[/]"))
    journal = document["journal"]
    if journal is None:
        console.print("no journal yet: the agent has not run in this work folder")
    else:
        console.print(f"experiments: {_counts(journal['experiments'])}", markup=False)
        console.print(f"cases: {_counts(journal['cases'])}", markup=False)
        waiting = journal["outbox_unsent"]
        console.print("outbox: nothing waiting to be sent" if not waiting else
                      f"outbox: [yellow]{waiting} message(s) waiting[/] since "
                      f"{escape(str(journal['oldest_unsent_at']))} UTC (the broker unreachable, or "
                      "the agent stopped?)")
        if journal["count_requests"]:
            console.print(f"count requests being answered: {journal['count_requests']}",
                          markup=False)
        if journal["revoked_digests"]:
            console.print(f"revoked images refused: {journal['revoked_digests']}", markup=False)
        if journal["open"]:
            table = Table("experiment", "state", *CASE_STATES, "since", title="open "
                          "experiments")
            for item in journal["open"]:
                table.add_row(escape(item["experiment_id"]), escape(item["state"] + (
                    f" ({item['reason']})" if item["reason"] else "")),
                    *(escape(str(item["cases"].get(s, 0))) for s in CASE_STATES),
                    escape(str(item["received_at"])))
            console.print(table)
    catalog = document["catalog"]
    console.print("catalog: " + (", ".join(f"{v} {k}" for k, v in catalog.items())
                                 if catalog else "not ingested yet"), markup=False)
    if document["recent"]:
        table = Table("at", "actor", "action", "target", title="latest audit entries")
        for entry in document["recent"]:
            table.add_row(escape(str(entry.get("at", ""))[:19]),
                          *(escape(str(entry.get(key, ""))) for key in
                            ("actor", "action", "target")))
        console.print(table)


def register(app: typer.Typer) -> None:
    app.command("status")(status)
