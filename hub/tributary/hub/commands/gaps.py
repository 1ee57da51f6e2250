"""``tributary gaps``: custody gaps, on the hub machine. List the records of spokes' custody
chains that never reached the hub, and accept one that cannot be filled (audited as
``operator:<login>``): the chain continues after it, cases still without a result are
settled as lost in transit, and the spoke is asked for the records that followed it."""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="Custody gaps: results lost on the way to the hub. List them, or "
                       "accept one the spoke cannot resend.", no_args_is_help=True)
console = Console(emoji=False)  # what messages and spokes carry is data, not markup

DatabaseOption = Annotated[str | None, typer.Option(
    help="The hub's database URL (default: TRIBUTARY_HUB_DATABASE_URL).")]


@app.command("list")
def list_(spoke: Annotated[str | None, typer.Option(help="Only this spoke's gaps.")] = None,
          database_url: DatabaseOption = None) -> None:
    """Every custody gap: open (the spoke is asked to resend), resolved, or accepted."""
    from sqlmodel import Session, select

    from tributary.hub.db import open_database
    from tributary.hub.models import CustodyGap
    from tributary.hub.settings import HubSettings

    settings = HubSettings.with_database(database_url)
    engine = open_database(settings)
    try:
        with Session(engine) as session:
            query = select(CustodyGap).order_by(CustodyGap.id)  # type: ignore[arg-type]
            if spoke:
                query = query.where(CustodyGap.spoke_id == spoke)
            rows = session.exec(query).all()
    finally:
        engine.dispose()
    table = Table("id", "spoke", "missing records", "state", "resend requests", "accepted by",
                  "reason")
    for g in rows:
        missing = f"{g.first_missing}..{g.last_missing if g.last_missing else '?'}"
        table.add_row(str(g.id), escape(g.spoke_id), escape(missing), escape(g.state),
                      str(g.resend_requests), escape(g.accepted_by or ""),
                      escape(g.accepted_reason or ""))
    console.print(table)


@app.command("accept")
def accept(spoke: Annotated[str, typer.Argument(help="The spoke.")],
           gap_id: Annotated[int, typer.Argument(help="The gap's id (from list).")],
           reason: Annotated[str, typer.Option(help="Why the records are accepted as lost.")],
           database_url: DatabaseOption = None) -> None:
    """Accept that an open gap's records are lost, after checking why."""
    from sqlmodel import Session

    from tributary.hub.db import open_database
    from tributary.hub.services import gaps, ingest
    from tributary.hub.settings import HubSettings
    from tributary.protocol.broker import PublishError, StompClient
    from tributary.protocol.signing import SigningKey

    settings = HubSettings.with_database(database_url)
    key = SigningKey.load(settings.signing_key)  # the hub's own key: the spoke pins it
    engine = open_database(settings)
    try:
        with Session(engine) as session:
            try:
                gap, experiments = gaps.accept(session, gap_id, spoke,
                                               f"operator:{getpass.getuser()}", reason)
            except gaps.NotAllowed as exc:
                console.print(f"[red]not accepted: {escape(str(exc))}[/]")
                raise typer.Exit(1) from None
            for experiment_id in experiments:
                ingest.complete_if_settled(session, experiment_id)
            session.commit()
            console.print(f"gap {gap.id} of {spoke} accepted; lost cases settled in "
                          f"{len(experiments)} experiment(s)", markup=False)
            if gap.last_missing is None:
                return
            client = StompClient(settings.broker(), "tributary-gaps").start(30)
            try:
                gaps.send_resend(client, key, spoke, gap.last_missing + 1)
            except PublishError as exc:
                console.print("[yellow]the records after the gap were not requested: "
                              f"{escape(str(exc))}; "
                              f"repeat with `tributary gaps resend {escape(spoke)} "
                              f"{gap.last_missing + 1}`[/]")
                raise typer.Exit(1) from None
            finally:
                client.close()
            console.print(f"asked {spoke} to resend its records from {gap.last_missing + 1}",
                          markup=False)
    finally:
        engine.dispose()


@app.command("resend")
def resend(spoke: Annotated[str, typer.Argument(help="The spoke.")],
           from_sequence: Annotated[int, typer.Argument(help="First record to resend.")],
           database_url: DatabaseOption = None) -> None:
    """Ask a spoke to publish its custody records from ``FROM_SEQUENCE`` on again (the hub
    ignores any it has). The hub does this by itself for open gaps."""
    from sqlmodel import Session

    from tributary.hub.db import open_database
    from tributary.hub.services import audit, gaps
    from tributary.hub.settings import HubSettings
    from tributary.protocol.broker import StompClient
    from tributary.protocol.signing import SigningKey

    settings = HubSettings.with_database(database_url)
    key = SigningKey.load(settings.signing_key)
    client = StompClient(settings.broker(), "tributary-gaps").start(30)
    try:
        message_id = gaps.send_resend(client, key, spoke, from_sequence)
    finally:
        client.close()
    engine = open_database(settings)
    try:
        with Session(engine) as session:
            audit.record(session, f"operator:{getpass.getuser()}", "custody.resend_requested",
                         spoke, from_sequence=from_sequence, message_id=message_id)
            session.commit()
    finally:
        engine.dispose()
    console.print(f"asked {spoke} to resend its records from {from_sequence}", markup=False)
