"""The spoke's command, ``tributary-spoke`` (also ``tributary spoke``): only assembles the
groups, each of which lives in its own module. Everything a site needs to run a spoke is
here, so that a spoke installs without the hub or the operator tools."""

from __future__ import annotations

from tributary.spoke.commands import data, deidentify, run, status, steward, store, trust

app = run.app
data.register(app)
status.register(app)
app.add_typer(steward.app, name="steward")
app.add_typer(trust.app, name="trust")
app.add_typer(store.app, name="store")
app.command("deidentify")(deidentify.main)

if __name__ == "__main__":
    app()
