"""Exceptions that carry the contract exit code an algorithm should end with."""

from __future__ import annotations

from .contract import ExitCode


class AlgorithmError(Exception):
    """A failure the algorithm knows how to explain; ``run`` exits with ``code``.

    Raising it (instead of calling ``sys.exit``) keeps algorithm code testable: the
    message goes to stderr and the exit code reaches the spoke unchanged.
    """

    default_code: int = ExitCode.ERROR

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = int(self.default_code if code is None else code)
        if not 1 <= self.code <= 255:
            raise ValueError(f"an error exit code must be in 1..255, got {self.code}")


class InvalidArguments(AlgorithmError):
    """The ``arguments`` in ALGO_ARG are not acceptable: exit code 2."""

    default_code = ExitCode.INVALID_ARGUMENTS


class UnsuitableInput(AlgorithmError):
    """This case cannot be processed by this algorithm (e.g. no CT): exit code 3."""

    default_code = ExitCode.UNSUITABLE_INPUT


class ContextError(AlgorithmError):
    """ALGO_ARG or the participant JSON is missing or malformed: exit code 1.

    That is the spoke's (or a local debugging set-up's) fault, not the algorithm's, so the
    message names the exact field at fault.
    """


class OutputError(AlgorithmError, ValueError):
    """``write_output`` refused the data (not an object, not JSON, too large)."""
