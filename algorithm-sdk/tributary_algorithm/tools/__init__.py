"""Developer tools: build an algorithm image, push it, and run it locally like a spoke.

They drive the ``docker`` and ``pip`` command-line tools, so they need nothing beyond the
standard library; they are not needed inside an algorithm image.
"""

from __future__ import annotations

from ._proc import ToolError
from .build import BuildResult, build_image, build_sdk_wheel, default_wheel_cache
from .localrun import (
    LocalParticipant,
    LocalRunResult,
    OutputCheck,
    build_participant,
    prepare_local_debug,
    print_result,
    run_local,
    validate_output_file,
)
from .push import push_image

__all__ = [
    "BuildResult",
    "LocalParticipant",
    "LocalRunResult",
    "OutputCheck",
    "ToolError",
    "build_image",
    "build_participant",
    "build_sdk_wheel",
    "default_wheel_cache",
    "prepare_local_debug",
    "print_result",
    "push_image",
    "run_local",
    "validate_output_file",
]
