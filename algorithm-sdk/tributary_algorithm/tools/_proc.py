"""Running the ``docker`` and ``pip`` command-line tools with useful failure messages."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

#: How much of a failed command's output to quote in the error message.
_TAIL_CHARS = 4000


class ToolError(RuntimeError):
    """A developer tool step failed; the message says which command and why."""


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _TAIL_CHARS else "…" + text[-_TAIL_CHARS:]


def run_command(
    args: Sequence[str],
    *,
    verbose: bool = False,
    check: bool = True,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdin_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; stream its output when ``verbose``, otherwise keep it for errors.
    ``stdin_text`` is written to its standard input (a secret never goes on the command line).

    Raises ``ToolError`` when the program is missing, times out, or (with ``check``) exits
    non-zero, quoting the end of its output so the cause is visible without a re-run.
    """
    args = [str(a) for a in args]
    if verbose:
        print(f"$ {shlex.join(args)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(
            args,
            stdout=None if verbose else subprocess.PIPE,
            stderr=subprocess.STDOUT if not verbose else None,
            text=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            cwd=cwd,
            check=False,
            input=stdin_text,
        )
    except FileNotFoundError as exc:
        raise ToolError(f"{args[0]!r} is not installed or not on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"`{shlex.join(args)}` did not finish within {timeout} s") from exc
    if check and proc.returncode != 0:
        detail = "" if verbose else f":\n{_tail(proc.stdout or '')}"
        raise ToolError(f"`{shlex.join(args)}` failed with exit status {proc.returncode}{detail}")
    return proc


def capture(args: Sequence[str], *, timeout: float | None = 120) -> str:
    """Run a short query command (``docker inspect`` …) and return its stdout."""
    args = [str(a) for a in args]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise ToolError(f"{args[0]!r} is not installed or not on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"`{shlex.join(args)}` did not finish within {timeout} s") from exc
    if proc.returncode != 0:
        raise ToolError(
            f"`{shlex.join(args)}` failed with exit status {proc.returncode}:\n"
            f"{_tail(proc.stderr or proc.stdout)}"
        )
    return proc.stdout
