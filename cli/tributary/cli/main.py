"""The ``tributary`` process (its console script, ``python -m tributary.cli``): the
command (:data:`tributary.cli.app.app`), then the end a lean one asks for: a
de-identifying command ends without tearing the interpreter down
(:func:`tributary.spoke.startup.exit_now`). Whoever goes on after a command (a test)
calls ``app`` instead."""

from __future__ import annotations

import sys

from tributary.cli.app import app


def main() -> None:
    try:
        app()
    except SystemExit as done:
        code = done.code
    else:
        code = 0
    startup = sys.modules.get("tributary.spoke.startup")  # loaded only by such a command
    if (code is None or isinstance(code, int)) and startup is not None and startup.lean():
        startup.exit_now(code or 0)
    sys.exit(code)


if __name__ == "__main__":
    main()
