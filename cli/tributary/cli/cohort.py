"""``tributary cohort``: cohorts across institutions (docs/cohorts.md). Only the assembly
of its groups, each in a module of its own."""

from __future__ import annotations

import typer

from tributary.cli import lazy

app = typer.Typer(
    help="Cohorts across institutions: find and link patients across sites.",
    no_args_is_help=True,
    cls=lazy.groups(psi="tributary.cli.cohort_psi:app"),
)
app.callback()(lazy.no_options)
