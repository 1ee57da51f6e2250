"""``python -m tributary.cli``: the same command as ``tributary``."""

from tributary.cli.app import app

app()
