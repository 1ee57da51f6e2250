"""The training contract's tensor file (safetensors, read strictly), for hub and spoke.

The one definition is the algorithm SDK's :mod:`tributary_algorithm.tensors` (an algorithm
image has the SDK but not the platform, and must write the very same format); this module is
where the platform imports it from. See that module for the checks a file must pass.
"""

from __future__ import annotations

from tributary_algorithm.tensors import (
    DEFAULT_LIMITS,
    DTYPES,
    NAME_PATTERN,
    TensorFileError,
    TensorLimits,
    Tensors,
    check_matches,
    decode_tensors,
    encode_tensors,
    read_tensors,
    spec_of,
    validate_tensors,
    write_tensors,
)

__all__ = [
    "DEFAULT_LIMITS", "DTYPES", "NAME_PATTERN", "TensorFileError", "TensorLimits", "Tensors",
    "check_matches", "decode_tensors", "encode_tensors", "read_tensors", "spec_of",
    "validate_tensors", "write_tensors",
]
