"""``tributary dlq``: list, replay and discard dead letters, on the hub machine.

It talks to the broker directly with the hub's broker settings (``TRIBUTARY_HUB_*``) and
records every replay and discard in the hub's audit trail (database and forensic log), as
``operator:<login>``. Replaying is safe to repeat: receivers ignore a message id they have
already applied."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

app = typer.Typer(help="Dead letters: messages the broker set aside (refused or expired). "
                       "List them with their reason, replay or discard them.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what messages and spokes carry is data, not markup

QueueOption = Annotated[str | None, typer.Option(
    "--queue", "-q", help="The dead-letter queue (default: look in all of them).")]
DatabaseOption = Annotated[str | None, typer.Option(
    help="The hub's database URL (default: TRIBUTARY_HUB_DATABASE_URL).")]


@contextmanager
def _hub(database_url: str | None) -> Iterator[tuple[object, object]]:
    from sqlmodel import Session

    from tributary.hub.db import open_database
    from tributary.hub.settings import HubSettings

    settings = HubSettings.with_database(database_url)
    engine = open_database(settings)
    try:
        with Session(engine) as session:
            yield settings, session
    finally:
        engine.dispose()


def _actor() -> str:
    return f"operator:{getpass.getuser()}"


def _find_queue(session, broker, message_id: str) -> str:  # type: ignore[no-untyped-def]
    from tributary.hub.services.deadletters import DeadLetterNotFound, find

    try:
        return find(session, broker, message_id).queue
    except DeadLetterNotFound as exc:
        raise typer.BadParameter(str(exc), param_hint="MESSAGE_ID") from None


@app.command("list")
def list_(queue: QueueOption = None, database_url: DatabaseOption = None,
          bodies: Annotated[bool, typer.Option(help="Print each body's beginning.")] = False,
          as_json: Annotated[bool, typer.Option(
              "--json", help="One JSON object per dead letter, whole (for scripts).")] = False
          ) -> None:
    """Every dead letter (results queue and each spoke's queue) with why it is there."""
    from tributary.hub.services.deadletters import list_dead_letters
    from tributary.protocol.deadletters import DeadLetterError

    with _hub(database_url) as (settings, session):
        try:
            letters = list_dead_letters(session, settings.broker(),  # type: ignore[attr-defined]
                                        [queue] if queue else None)
        except DeadLetterError as exc:
            console.print(f"[red]{escape(str(exc))}[/]")
            raise typer.Exit(1) from None
    if as_json:  # the table folds long reasons to the terminal's width; this never does
        for letter in letters:
            print(letter.model_dump_json())
        return
    if not letters:
        console.print("no dead letters")
        return
    table = Table(*(Column(h, overflow="fold") for h in (  # ids whole: replay takes them
        "message id", "from queue", "kind", "experiment", "when", "size", "reason")))
    for letter in letters:
        table.add_row(*(escape(v) for v in (  # a dead letter is outside text: data, not markup
            letter.broker_message_id, letter.original_destination, letter.kind or "?",
            letter.experiment_id or "",
            f"{letter.timestamp:%Y-%m-%d %H:%M:%S}" if letter.timestamp else "",
            str(letter.size), letter.reason)))
    console.print(table)
    if bodies:
        for letter in letters:
            console.print(f"[bold]{escape(letter.broker_message_id)}[/] "
                          f"{escape(letter.body_preview[:300])}")
    console.print(f"{len(letters)} dead letter(s)")


@app.command("replay")
def replay(message_id: Annotated[str, typer.Argument(help="Broker message id (from list).")],
           queue: QueueOption = None, database_url: DatabaseOption = None) -> None:
    """Send a dead letter back to the queue it came from (after fixing the cause)."""
    from tributary.hub.services import deadletters
    from tributary.protocol.deadletters import DeadLetterError

    with _hub(database_url) as (settings, session):
        broker = settings.broker()  # type: ignore[attr-defined]
        dlq = queue or _find_queue(session, broker, message_id)
        try:
            letter = deadletters.replay(session, broker, dlq, message_id, _actor())
        except DeadLetterError as exc:
            console.print(f"[red]not replayed: {escape(str(exc))}[/]")
            raise typer.Exit(1) from None
    console.print(f"replayed {letter.broker_message_id} to {letter.original_destination}",
                  markup=False)


@app.command("discard")
def discard(message_id: Annotated[str, typer.Argument(help="Broker message id (from list).")],
            reason: Annotated[str, typer.Option(help="Why it is discarded (audited).")],
            queue: QueueOption = None, database_url: DatabaseOption = None) -> None:
    """Delete a dead letter for good; the audit trail keeps its hash and a preview."""
    from tributary.hub.services import deadletters
    from tributary.protocol.deadletters import DeadLetterError

    with _hub(database_url) as (settings, session):
        broker = settings.broker()  # type: ignore[attr-defined]
        dlq = queue or _find_queue(session, broker, message_id)
        try:
            letter = deadletters.discard(session, broker, dlq, message_id, _actor(), reason)
        except DeadLetterError as exc:
            console.print(f"[red]not discarded: {escape(str(exc))}[/]")
            raise typer.Exit(1) from None
    console.print(f"discarded {letter.broker_message_id} from {dlq}", markup=False)
