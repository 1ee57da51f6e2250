"""The ``tributary`` command: only the assembly of its groups. Each group is a module of
its own, here or, for a role's own commands, in that role's distribution."""

from __future__ import annotations

import typer

from tributary.cli import (
    algorithm,
    audit,
    broker,
    bundle,
    contract,
    counts,
    demo,
    login,
    pki,
    publisher,
    services,
    study,
)
from tributary.hub.commands import app as hub
from tributary.hub.commands import dlq, gaps
from tributary.spoke.commands import app as spoke

app = typer.Typer(
    help="Tributary: move algorithms to medical imaging data, not data to algorithms.",
    no_args_is_help=True, rich_markup_mode="rich",
)
app.add_typer(services.app, name="services")
app.add_typer(hub.app, name="hub")
app.add_typer(spoke.app, name="spoke")
app.add_typer(contract.app, name="contract")
app.add_typer(broker.app, name="broker")
app.add_typer(pki.app, name="pki")
app.add_typer(algorithm.app, name="algorithm")
app.add_typer(publisher.app, name="publisher")
app.add_typer(audit.app, name="audit")
app.add_typer(counts.app, name="counts")
app.add_typer(study.app, name="study")
app.add_typer(dlq.app, name="dlq")
app.add_typer(gaps.app, name="gaps")
app.add_typer(bundle.app, name="bundle")
app.command("demo")(demo.demo)
app.command("login")(login.login)

if __name__ == "__main__":
    app()
