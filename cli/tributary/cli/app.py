"""The ``tributary`` command: only the assembly of its groups. Each group is a module of
its own, here or, for a role's own commands, in that role's distribution, imported when
it is used (:mod:`tributary.cli.lazy`): a command starts without loading the others."""

from __future__ import annotations

import typer

from tributary.cli import lazy

app = typer.Typer(
    help="Tributary: move algorithms to medical imaging data, not data to algorithms.",
    no_args_is_help=True, rich_markup_mode="rich", add_completion=True,
    cls=lazy.groups(
        services="tributary.cli.services:app",
        hub="tributary.hub.commands.app:app",
        spoke="tributary.spoke.commands.app:app",
        contract="tributary.cli.contract:app",
        broker="tributary.cli.broker:app",
        pki="tributary.cli.pki:app",
        federation="tributary.cli.federation:app",
        algorithm="tributary.cli.algorithm:app",
        publisher="tributary.cli.publisher:app",
        audit="tributary.cli.audit:app",
        counts="tributary.cli.counts:app",
        cohort="tributary.cli.cohort:app",
        access="tributary.cli.access:app",
        study="tributary.cli.study:app",
        training="tributary.cli.training:app",
        vertical="tributary.cli.vertical:app",
        dlq="tributary.hub.commands.dlq:app",
        gaps="tributary.hub.commands.gaps:app",
        bundle="tributary.cli.bundle:app",
        demo="tributary.cli.demo:demo",
        login="tributary.cli.login:login",
    ),
)
app.callback()(lazy.no_options)

if __name__ == "__main__":
    app()
