"""Running an algorithm's ``main(ctx)`` with the contract's exit-code discipline.

The spoke only sees an exit status and ``output.json``; ``run`` makes sure every way a
``main`` can end maps onto the contract: a result is written atomically, known failures
exit with their code, and anything unexpected exits 1 with a short traceback on stderr
(the spoke keeps the tail of stderr for the experiment owner).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Mapping
from typing import Any, Callable, NoReturn, Optional

from .context import Context, load_context
from .contract import ExitCode, exit_label
from .errors import AlgorithmError

Main = Callable[[Context], Optional[Mapping[str, Any]]]

#: How many innermost stack frames an unexpected exception shows: enough to locate the bug,
#: short enough to survive the spoke's stderr truncation.
TRACEBACK_FRAMES = 6


def _report(code: int, message: str) -> None:
    print(f"{exit_label(code)}: {message}", file=sys.stderr, flush=True)


def execute(main: Main, ctx: Context | None = None) -> int:
    """Run ``main`` and return the exit code it should end with, without exiting.

    ``main`` either returns the output dict (written here) or writes it itself with
    ``ctx.write_output`` and returns ``None``.
    """
    try:
        if ctx is None:
            ctx = load_context()
        result = main(ctx)
        if result is None:
            if not ctx.output_written:
                raise AlgorithmError(
                    "main returned None and wrote no output; return a dict or call "
                    "ctx.write_output()"
                )
        elif isinstance(result, Mapping):
            ctx.write_output(result)
        else:
            raise AlgorithmError(
                f"main must return a dict (the output object), not {type(result).__name__}"
            )
    except AlgorithmError as exc:
        _report(exc.code, exc.message)
        return exc.code
    except SystemExit as exc:  # ctx.fail() or sys.exit() inside main
        if exc.code is None:
            return ExitCode.SUCCESS
        if isinstance(exc.code, int):
            return exc.code
        _report(ExitCode.ERROR, str(exc.code))
        return ExitCode.ERROR
    except KeyboardInterrupt:
        _report(ExitCode.ERROR, "interrupted")
        return 130
    except Exception as exc:
        lines = traceback.format_exception(
            type(exc), exc, exc.__traceback__, limit=-TRACEBACK_FRAMES
        )
        sys.stderr.write("".join(lines))
        _report(ExitCode.ERROR, f"unexpected {type(exc).__name__}: {exc}")
        return ExitCode.ERROR
    finally:
        sys.stdout.flush()
    return ExitCode.SUCCESS


def run(main: Main) -> NoReturn:
    """Run ``main(ctx)`` as the container's program and exit with the contract code.

    Usable as ``run(main)`` under ``if __name__ == "__main__":`` or as a ``@run`` decorator
    in the entry script. It runs immediately and never returns, so keep ``@run`` out of
    modules that tests import.
    """
    sys.exit(execute(main))
