"""``tributary spoke ingest | catalog | exclusions``: the data steward's view of the
spoke's de-identified store and catalog."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tributary.spoke.commands.options import ConfigOption

if TYPE_CHECKING:
    from rich.console import Console


@functools.cache
def _console() -> Console:
    """The commands' console, made when first used: ingest imports rich after its lean
    start (:mod:`tributary.spoke.startup`), with the collector paused, as deidentify
    does. Paths, source names and error messages are data, not markup: they are escaped
    where they are printed (a file named "CT [arterial].dcm" is shown as named), and no
    ``:emoji:`` code is replaced."""
    from rich.console import Console

    return Console(emoji=False)


def load_config(path: Path) -> Any:
    """The spoke configuration, or a clear message and exit 2 when it is invalid."""
    from pydantic import ValidationError

    from tributary.spoke.config import SpokeConfig

    try:
        return SpokeConfig.load(path)
    except (ValidationError, OSError, ValueError) as exc:
        from rich.markup import escape

        _console().print(f"[red]invalid configuration {escape(str(path))}:[/] "
                         f"{escape(str(exc))}")
        raise typer.Exit(2) from None


def ingest(
    config: ConfigOption,
    rebuild: Annotated[bool, typer.Option(
        "--rebuild", help="Empty the store and catalog first and prepare every input again "
        "(after changing \\[deidentification]); refused while the agent runs.")] = False,
) -> None:
    """Ingest the configured sources into the de-identified store and catalog. Only new or
    changed inputs are read; running it again over unchanged sources is a no-op."""
    import getpass

    from tributary.spoke.startup import lean_start, started

    # As deidentify starts: before anything imports pydicom; its workers are forked after
    # the imports, and their frozen objects are not copied by the collector's passes.
    lean_start()
    try:
        from rich.markup import escape
        from rich.table import Table

        from tributary.protocol.auditlog import AuditLog
        from tributary.spoke.commands.progress import bars
        from tributary.spoke.deid import profile_name
        from tributary.spoke.ingest import ingest as run_ingest
        from tributary.spoke.ingest import rebuild as rebuild_store
        from tributary.spoke.sources import SourceUnavailable
        from tributary.spoke.store import StoreFormatError

        console = _console()
    finally:
        started()

    settings = load_config(config)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    audit = AuditLog(settings.work_dir / "audit.jsonl")  # the agent's log: one history
    actor = f"cli:{getpass.getuser()}"
    if rebuild:
        from tributary.spoke.journal import WorkDirBusy

        try:
            rebuild_store(settings)
        except WorkDirBusy as exc:
            console.print(f"[red]not rebuilt:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
        audit.append(actor, "catalog.rebuilt", settings.spoke_id,
                     {"deid_profile": profile_name(settings.deidentification)})
        console.print("store and catalog emptied; preparing every input again")
    with bars(console) as shown:  # no refresh thread: the workers may be forked
        try:
            report = run_ingest(settings, progress=shown.show)
        except (SourceUnavailable, StoreFormatError, FileNotFoundError, ValueError) as exc:
            audit.append(actor, "catalog.ingest_failed", settings.spoke_id,
                         {"error": f"{type(exc).__name__}: {exc}"[:2000]})
            console.print(f"[red]ingest stopped:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
    audit.append(actor, "catalog.ingested", settings.spoke_id,
                 {"stored": report.stored, "duplicates": report.duplicates,
                  "excluded": report.excluded, "unchanged": report.unchanged})
    table = Table("source", "inputs", "stored", "unchanged", "duplicates", "excluded")
    for name, counts in report.per_source.items():
        table.add_row(escape(name), *(escape(str(counts[k])) for k in
                                      ("inputs", "stored", "unchanged", "duplicates", "excluded")))
    console.print(table)
    if settings.attributes_path is not None:
        console.print(f"attributes: {report.attributes_cases} cases matched, "
                      f"{report.attributes_unmatched} rows without an ingested case", markup=False)
    if report.excluded or report.duplicates:
        console.print("see [bold]tributary spoke exclusions[/] for what was left out and why")


def exclusions(
    config: ConfigOption,
    source: Annotated[str | None, typer.Option(help="Only this source.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")
                       ] = False,
) -> None:
    """Show every input that did not enter the store (excluded or duplicate) and why."""
    from rich.markup import escape
    from rich.table import Column, Table

    from tributary.spoke.ingest import open_catalog

    catalog = open_catalog(load_config(config))
    rows = catalog.exclusions(source)
    catalog.close()
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row.__dict__))
        return
    console = _console()
    table = Table(*(Column(h, overflow="fold") for h in  # paths whole, never cut with "…"
                    ("source", "input", "status", "reason", "seen")))
    for row in rows:
        table.add_row(*(escape(str(v)) for v in
                        (row.source, row.ref, row.status, row.reason, row.seen_at)))
    console.print(table)
    console.print(f"{len(rows)} inputs left out")


def _value(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


def catalog(
    config: ConfigOption,
    modality: Annotated[str | None, typer.Option(help="Series modality, e.g. CT.")] = None,
    body_part: Annotated[str | None, typer.Option(help="BodyPartExamined, e.g. CHEST.")
                         ] = None,
    min_slices: Annotated[int | None, typer.Option(help="At least this many instances.")
                          ] = None,
    max_slices: Annotated[int | None, typer.Option(help="At most this many instances.")
                          ] = None,
    attribute: Annotated[list[str] | None, typer.Option(
        help="NAME=VALUE: case attribute equals VALUE (repeatable).")] = None,
    case: Annotated[list[str] | None, typer.Option(help="Only this case (repeatable).")
                    ] = None,
    max_cases: Annotated[int | None, typer.Option(help="At most this many cases.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the cases as JSON.")] = False,
) -> None:
    """Inspect the catalog: counts, and the cases (with their series) matching criteria,
    as an experiment with the same cohort selection would get them."""
    from dataclasses import asdict

    from pydantic import ValidationError
    from rich.markup import escape
    from rich.table import Table

    from tributary.protocol.messages import CohortSelection
    from tributary.spoke.ingest import open_catalog

    attributes = {}
    for item in attribute or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"--attribute needs NAME=VALUE, got {item!r}")
        attributes[name] = _value(value)
    try:
        selection = CohortSelection(modality=modality, body_part=body_part,
                                    min_slices=min_slices, max_slices=max_slices,
                                    attributes=attributes, case_ids=case, max_cases=max_cases)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from None
    settings = load_config(config)
    store = open_catalog(settings)
    counts = store.counts()
    cases = store.select(selection, policy=False)
    hidden = sorted(set(attributes) - set(settings.policy.releasable_attributes))
    store.close()
    if as_json:
        typer.echo(json.dumps([asdict(c) for c in cases], indent=2))
        return
    console = _console()
    console.print("catalog: " + ", ".join(f"{v} {k}" for k, v in counts.items()), markup=False)
    table = Table("case", "series", "modality", "body part", "slices", "size", "spacing (mm)",
                  "attributes")
    for item in cases:
        for index, series in enumerate(item.series):
            spacing = series.pixel_spacing or []
            table.add_row(*(escape(cell or "") for cell in (  # header values and attributes: data
                item.case_id if index == 0 else "", series.series_id, series.modality,
                series.body_part or "", str(series.instance_count),
                f"{series.rows}x{series.columns}" if series.rows else "",
                "x".join(f"{v:g}" for v in [*spacing, *([series.slice_thickness]
                                                         if series.slice_thickness else [])]),
                ", ".join(f"{k}={json.dumps(v)[:24]}" for k, v in item.attributes.items())
                if index == 0 else "")))
    console.print(table)
    console.print(f"{len(cases)} cases match")
    if hidden:
        console.print(f"[yellow]note:[/] experiments cannot select on {escape(', '.join(hidden))} "
                      "(not in releasable_attributes)")


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest)
    app.command("catalog")(catalog)
    app.command("exclusions")(exclusions)
