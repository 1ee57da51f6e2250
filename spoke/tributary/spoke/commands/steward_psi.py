"""``tributary spoke steward psi``: the site's data steward approves or refuses each private
set intersection the hub asks this spoke to take part in. Shown: who asked and why, the
mode (a count only, or linking pseudonyms), the leader and the partner spokes and their
key ids (compare them with what the partner sites tell you), and how many of the site's
patients carry the agreed identifier. A refusal is reported to the hub with its reason."""

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

app = typer.Typer(help="Approve or refuse private set intersections.", no_args_is_help=True)
console = Console(emoji=False)  # outside text is printed as data, not markup



def _open(config: Path):  # type: ignore[no-untyped-def]
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.psi_store import PsiDesk

    loaded = SpokeConfig.load(config)
    return loaded, PsiDesk(loaded.work_dir / "journal.db")


@app.command("pending")
def pending(config: ConfigOption,
            everything: Annotated[bool, typer.Option("--all", help="Decided ones too.")] = False,
            as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False
            ) -> None:
    """Show the PSI requests waiting for a decision."""
    from tributary.protocol.signing import PublicKey
    from tributary.spoke.psi_identifiers import NoIdentifiers, link_identifiers

    loaded, desk = _open(config)
    with desk:
        rows = desk.requests(everything)
    try:
        patients: int | str = len(link_identifiers(loaded))
    except NoIdentifiers as exc:
        patients = f"none: {exc}"
    shown = [{
        "psi_id": r.request.psi_id, "state": r.state, "steward": r.steward,
        "requested_by": r.request.requested_by, "purpose": r.request.purpose,
        "mode": r.request.mode.value, "leader": r.request.leader,
        "partners": {p.spoke_id: PublicKey.from_pem(p.public_key_pem).keyid[:16]
                     for p in r.request.participants if p.spoke_id != loaded.spoke_id},
        "expires_at": r.request.expires_at.isoformat() if r.request.expires_at else None,
        "patients_with_identifier": patients, "received_at": r.received_at,
    } for r in rows]
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    if not shown:
        console.print("no PSI request waits for the steward")
        return
    for item in shown:
        table = Table(title=f"PSI {escape(item['psi_id'])}", show_header=False,
                      title_justify="left")
        table.add_column()
        table.add_column(overflow="fold")  # every character shown, never cut off
        for label, value in item.items():
            if label != "psi_id":
                table.add_row(escape(label), escape(json.dumps(value) if isinstance(value, dict)
                                            else str(value)))
        console.print(table)


def _decide(config: Path, psi_id: str, approve: bool, steward: str | None,
            reason: str | None) -> None:
    from tributary.protocol.auditlog import AuditLog

    loaded, desk = _open(config)
    who = steward or getpass.getuser()
    verb = "approved" if approve else "refused"
    with desk:
        try:
            desk.decide(psi_id, approve, who, reason)
        except LookupError as exc:
            console.print(f"[red]{escape(str(exc))}[/] (see `tributary spoke steward psi pending`)")
            raise typer.Exit(1) from None
    AuditLog(loaded.work_dir / "audit.jsonl").append(who, f"steward.psi_{verb}_decided",
                                                       psi_id, {"reason": reason})
    console.print(f"PSI {psi_id} {verb}", markup=False)


@app.command("approve")
def approve(psi_id: Annotated[str, typer.Argument(help="The PSI.")], config: ConfigOption,
            steward: StewardOption = None,
            reason: Annotated[str | None, typer.Option(help="A note for the audit log.")] = None
            ) -> None:
    """Take part in the PSI: the spoke starts the protocol within a second or so."""
    _decide(config, psi_id, True, steward, reason)


@app.command("refuse")
def refuse(psi_id: Annotated[str, typer.Argument(help="The PSI.")], config: ConfigOption,
           reason: Annotated[str, typer.Option(help="Why; reported to the hub and audited.")],
           steward: StewardOption = None) -> None:
    """Refuse the PSI; the hub is told why and nothing of the site's identifiers is used."""
    if not reason.strip():
        raise typer.BadParameter("a refusal needs a reason", param_hint="--reason")
    _decide(config, psi_id, False, steward, reason)
