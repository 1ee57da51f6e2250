"""The spoke's command, ``tributary-spoke`` (also ``tributary spoke``): only assembles the
commands, each of which lives in its own module, imported when it is used
(:mod:`tributary.spoke.commands.lazy`). Everything a site needs to run a spoke is here,
so that a spoke installs without the hub or the operator tools."""

from __future__ import annotations

import typer

from tributary.spoke.commands.lazy import commands

_RUN = "tributary.spoke.commands.run"
_DATA = "tributary.spoke.commands.data"

app = typer.Typer(
    help="Run a spoke next to an institution's data.", no_args_is_help=True,
    cls=commands(
        run=f"{_RUN}:spoke_run", init=f"{_RUN}:spoke_init", key=f"{_RUN}:spoke_key",
        ingest=f"{_DATA}:ingest", catalog=f"{_DATA}:catalog",
        exclusions=f"{_DATA}:exclusions",
        description="tributary.spoke.commands.description:description",
        status="tributary.spoke.commands.status:status",
        steward="tributary.spoke.commands.steward:app",
        vertical="tributary.spoke.commands.vertical:app",
        trust="tributary.spoke.commands.trust:app",
        store="tributary.spoke.commands.store:app",
        deidentify="tributary.spoke.commands.deidentify:main",
    ),
)


@app.callback()
def _spoke() -> None:
    """Run a spoke next to an institution's data."""


if __name__ == "__main__":
    app()
