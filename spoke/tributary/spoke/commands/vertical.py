"""``tributary spoke vertical``: the site's data steward sees the vertical studies the hub
invited this spoke to (the PSI, this site's role, the attributes it would read, the other
site) and approves or rejects each before anything is read. Decisions are written to the
spoke's vertical record and audit log; the running spoke acts on them within a second."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tributary.spoke.commands.options import ConfigOption, StewardOption

app = typer.Typer(help="The site's data steward: vertical studies (approve, reject, list).",
                  no_args_is_help=True)
console = Console(emoji=False)  # outside text is printed as data, not markup



def _desk(config: Path):  # type: ignore[no-untyped-def]
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.training_agent import load_or_create_secret
    from tributary.spoke.vertical_desk import VerticalDesk

    loaded = SpokeConfig.load(config)
    work = loaded.work_dir
    return loaded, VerticalDesk(work / "vertical.sqlite",
                                load_or_create_secret(work / "vertical-journal.key"))


@app.command("list")
def list_studies(config: ConfigOption,
                 as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")]
                 = False) -> None:
    """Every vertical study here with its state (pending: waiting for the steward)."""
    _, desk = _desk(config)
    try:
        studies = desk.studies()
    finally:
        desk.close()
    rows = [{"study_id": s.study_id, "state": s.state, "psi_id": s.invite.psi_id,
             "role": s.invite.role, "attributes": s.invite.attributes, "label": s.invite.label,
             "peer": s.invite.peer, "rounds": s.invite.hyperparameters.rounds,
             "release_coefficients": s.invite.release_coefficients, "steward": s.steward,
             "reason": s.reason} for s in studies]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="vertical studies")
    for column in ("study", "state", "PSI", "role", "attributes", "peer", "release"):
        table.add_column(escape(column))
    for r in rows:
        table.add_row(*(escape(str(v)) for v in (
            r["study_id"], r["state"], r["psi_id"], r["role"],
            ", ".join(r["attributes"]) + (f"; label {r['label']}" if r["label"] else ""),
            r["peer"])), "yes" if r["release_coefficients"] else "no")
    console.print(table)


def _decide(config: Path, study_id: str, approve: bool, steward: str | None,
            reason: str | None) -> None:
    from tributary.protocol.auditlog import AuditLog

    loaded, desk = _desk(config)
    who = steward or getpass.getuser()
    verb = "approved" if approve else "rejected"
    try:
        desk.decide(study_id, approve, who, reason)
    except LookupError as exc:
        console.print(f"[red]{escape(str(exc))}[/] (see `tributary spoke vertical list`)")
        raise typer.Exit(1) from None
    finally:
        desk.close()
    AuditLog(loaded.work_dir / "audit.jsonl").append(who, f"steward.vertical_{verb}", study_id,
                                                     {"reason": reason})
    console.print(f"vertical study {study_id} {verb}", markup=False)


@app.command("approve")
def approve(study_id: Annotated[str, typer.Argument(help="The vertical study.")],
            config: ConfigOption, steward: StewardOption = None,
            reason: Annotated[str | None, typer.Option(help="A note for the audit log.")]
            = None) -> None:
    """Approve a vertical study: the spoke reads its columns and takes part."""
    _decide(config, study_id, True, steward, reason)


@app.command("reject")
def reject(study_id: Annotated[str, typer.Argument(help="The vertical study.")],
           config: ConfigOption,
           reason: Annotated[str, typer.Option(help="Why; reported to the hub and audited.")],
           steward: StewardOption = None) -> None:
    """Reject a vertical study: nothing is read; the hub is told why."""
    if not reason.strip():
        raise typer.BadParameter("a rejection needs a reason", param_hint="--reason")
    _decide(config, study_id, False, steward, reason)
