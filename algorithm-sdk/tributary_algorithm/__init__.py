"""Tributary algorithm SDK: the runtime half of the algorithm contract v1.

Inside an algorithm container::

    from tributary_algorithm import load_context, run

    def main(ctx):
        return {"series": len(ctx.series)}

    if __name__ == "__main__":
        run(main)

The developer tools (build, push, local test) live in :mod:`tributary_algorithm.tools`
and are only needed on a workstation.
"""

from __future__ import annotations

from .context import (
    ALGO_ARG_FILE_ENV,
    Context,
    Series,
    encode_output,
    load_context,
    report_progress,
)
from .contract import (
    ALGO_ARG_ENV,
    CONTRACT_VERSION,
    DEFAULT_OUTPUT_LIMIT_BYTES,
    INPUT_ROOT,
    OUTPUT_DIR,
    OUTPUT_PATH,
    PARTICIPANT_PATH,
    PROGRESS_PATH,
    SCRATCH_DIR,
    ExitCode,
)
from .errors import (
    AlgorithmError,
    ContextError,
    InvalidArguments,
    OutputError,
    UnsuitableInput,
)
from .runner import execute, run
from .schema import SchemaError, validate_arguments

__version__ = "0.1.0"

__all__ = [
    "ALGO_ARG_ENV",
    "ALGO_ARG_FILE_ENV",
    "CONTRACT_VERSION",
    "DEFAULT_OUTPUT_LIMIT_BYTES",
    "INPUT_ROOT",
    "OUTPUT_DIR",
    "OUTPUT_PATH",
    "PARTICIPANT_PATH",
    "PROGRESS_PATH",
    "SCRATCH_DIR",
    "AlgorithmError",
    "Context",
    "ContextError",
    "ExitCode",
    "InvalidArguments",
    "OutputError",
    "SchemaError",
    "Series",
    "UnsuitableInput",
    "__version__",
    "encode_output",
    "execute",
    "load_context",
    "report_progress",
    "run",
    "validate_arguments",
]
