"""``tributary spoke store migrate``: the de-identified store's own maintenance."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Maintain the spoke's de-identified store.", no_args_is_help=True)


@app.command("migrate")
def migrate(
    config: Annotated[Path, typer.Option(
        "--config", "-c", exists=True, dir_okay=False,
        help="The spoke's TOML configuration file.")],
) -> None:
    """Convert a store written before its format was marked to the current format (objects
    renamed, never rewritten; series links and catalog follow). Safe to run again;
    refused while the agent runs."""
    import getpass

    from rich.console import Console
    from rich.markup import escape

    from tributary.protocol.auditlog import AuditLog
    from tributary.spoke.commands.data import load_config
    from tributary.spoke.ingest import migrate_store
    from tributary.spoke.journal import WorkDirBusy
    from tributary.spoke.store import StoreFormatError

    console = Console(emoji=False)  # errors name paths: data, not markup
    settings = load_config(config)
    try:
        report = migrate_store(settings)
    except (WorkDirBusy, StoreFormatError) as exc:
        console.print(f"[red]not migrated:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    if report.already_current:
        console.print("the store is already in the current format; nothing to do")
        return
    AuditLog(settings.work_dir / "audit.jsonl").append(
        f"cli:{getpass.getuser()}", "store.migrated", settings.spoke_id,
        report.model_dump(mode="json"))
    console.print(f"store converted: {report.objects} objects, {report.renamed} renamed, "
                  f"{report.catalog_rows} catalog rows, {report.links} series links", markup=False)
