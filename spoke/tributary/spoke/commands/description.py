"""``tributary spoke description``: what this site publishes to the federated catalog, so
its data steward and data protection officer see exactly what leaves."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from tributary.spoke.commands.data import ConfigOption, load_config

console = Console(emoji=False)  # DICOM header values are data, not markup


def description(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")
                       ] = False,
) -> None:
    """Show the description this site would publish now (counts with small cells and their
    complements withheld, years, de-identification profile, release terms, releasable
    attribute names) and the digest of the one last sent."""
    from tributary.spoke.catalog_publisher import STATE_FILE, PublishedState
    from tributary.spoke.description import describe
    from tributary.spoke.ingest import open_catalog

    settings = load_config(config)
    with open_catalog(settings) as catalog:
        current = describe(settings, catalog)
    sent = settings.work_dir / STATE_FILE
    last = PublishedState.model_validate_json(sent.read_bytes()) if sent.exists() else None
    if as_json:
        typer.echo(json.dumps({"now": current.model_dump(mode="json"),
                               "last_sent_digest": last.digest if last else None}, indent=2))
        return
    k = current.terms.min_cell
    console.print(f"cases: {current.cases if current.cases is not None else f'fewer than {k}'}"
                  f" (k = {k}); studies {current.studies}, series {current.series}", markup=False)
    for cell in current.cells:
        console.print(f"  {cell.modality or 'any modality'} / {cell.body_part or 'any body part'}"
                      f": {cell.cases}", markup=False)
    if current.years:
        console.print(f"years: {current.years.first}-{current.years.last}", markup=False)
    console.print(f"profile: {current.deid_profile}; options "
                  f"{', '.join(current.deid_options) or 'none'}", markup=False)
    console.print(f"attributes: {', '.join(current.attributes) or 'none'}", markup=False)
    console.print(f"digest now: {current.digest()}; last sent: "
                  f"{last.digest if last else 'nothing yet'}", markup=False)
