"""The hub's command, ``tributary-hub`` (also ``tributary hub``): only assembles the groups,
each of which lives in its own module."""

from __future__ import annotations

from tributary.hub.commands import dlq, gaps, processes

app = processes.app
app.add_typer(dlq.app, name="dlq")
app.add_typer(gaps.app, name="gaps")

if __name__ == "__main__":
    app()
