"""``python -m tributary.cli``: the same command as ``tributary``."""

from tributary.cli.main import main

main()
