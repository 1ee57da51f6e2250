"""The training contract's tensor file: named numpy arrays in the safetensors format.

Model parameters cross a trust boundary twice: the hub's global model goes into an
algorithm container, and the container's update comes back to the spoke, which clips,
noises and masks it. The update is written by code the site does not control, so it is
read as hostile: a size limit before anything is read, a bounded JSON header, names from a
fixed alphabet, a whitelist of dtypes (float32, float64, integers), bounded shapes and
offsets that tile the data exactly. safetensors holds no code (unlike pickle, which
``numpy.load(allow_pickle=True)`` and ``torch.load`` would execute), and the maintained
``safetensors`` library reads the data once the header has passed these checks.

This module is the one definition (it needs ``numpy`` and ``safetensors``:
``pip install 'tributary-algorithm[training]'``); the platform imports it through
``tributary.protocol.training.tensors``.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The safetensors dtype codes accepted, and their numpy dtypes (little-endian).
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"), "U8": np.dtype("u1"), "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"), "U64": np.dtype("<u8"),
}
_CODE_OF = {dtype: code for code, dtype in DTYPES.items()}

#: Tensor names: what a framework calls its layers (``layer1.weight``, ``arr_000``); no
#: spaces, no control characters, nothing a log or a path could misread.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
#: Metadata (a string-to-string map in the header) is refused: it would be a side channel.
HEADER_METADATA_KEY = "__metadata__"


class TensorFileError(ValueError):
    """A tensor file (or the arrays to write) breaks the format or its limits."""


@dataclass(frozen=True)
class TensorLimits:
    """How much a tensor file may hold. The defaults suit models up to 10^8 parameters;
    a reader that knows the expected model passes tighter limits (or ``expected``)."""

    max_file_bytes: int = 1 << 30
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_dims: int = 8
    max_elements: int = 1 << 28


DEFAULT_LIMITS = TensorLimits()

Tensors = dict[str, np.ndarray]


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise TensorFileError(f"tensor name {name!r} is not allowed (letters, digits, _.:/-; "
                              "at most 128 characters)")
    return name


def validate_tensors(tensors: Mapping[str, Any], limits: TensorLimits = DEFAULT_LIMITS) -> Tensors:
    """Check arrays before writing: names, dtypes, shapes, finite floats. Returns C-contiguous
    little-endian copies keyed in the given order."""
    if not isinstance(tensors, Mapping):
        raise TensorFileError(f"parameters must be a mapping of name to array, "
                              f"not {type(tensors).__name__}")
    if len(tensors) > limits.max_tensors:
        raise TensorFileError(f"{len(tensors)} tensors, over the limit of {limits.max_tensors}")
    out: Tensors = {}
    total = 0
    for name, value in tensors.items():
        _check_name(name)
        array = np.asarray(value)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _CODE_OF:
            raise TensorFileError(f"tensor {name!r} has dtype {array.dtype}; allowed: "
                                  "float32, float64 and integer types")
        if array.ndim > limits.max_dims:
            raise TensorFileError(f"tensor {name!r} has {array.ndim} dimensions, over "
                                  f"{limits.max_dims}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise TensorFileError(f"tensor {name!r} holds NaN or infinity")
        total += array.size
        if total > limits.max_elements:
            raise TensorFileError(f"more than {limits.max_elements} elements in all")
        out[name] = np.array(array, dtype=dtype, order="C")  # keeps 0-d arrays 0-d
    return out


def encode_tensors(tensors: Mapping[str, Any], limits: TensorLimits = DEFAULT_LIMITS) -> bytes:
    """The safetensors bytes of ``tensors`` (checked first, no metadata)."""
    from safetensors.numpy import save

    data = save(validate_tensors(tensors, limits))
    if len(data) > limits.max_file_bytes:
        raise TensorFileError(f"{len(data)} bytes, over the limit of {limits.max_file_bytes}")
    return data


def write_tensors(path: str | os.PathLike[str], tensors: Mapping[str, Any],
                  limits: TensorLimits = DEFAULT_LIMITS) -> str:
    """Write ``tensors`` to ``path`` atomically (temporary file in the same folder, fsync,
    rename), world-readable so the spoke can read it as another user. Returns the path."""
    data = encode_tensors(tensors, limits)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tensors-", suffix=".tmp",
                               dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _expected_size(shape: list[int], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize


def decode_tensors(data: bytes, limits: TensorLimits = DEFAULT_LIMITS,
                   expected: Mapping[str, tuple[tuple[int, ...], str]] | None = None) -> Tensors:
    """Read safetensors ``data`` strictly; ``expected`` (name to (shape, numpy dtype name),
    e.g. from the global model) additionally requires exactly those tensors."""
    if len(data) > limits.max_file_bytes:
        raise TensorFileError(f"{len(data)} bytes, over the limit of {limits.max_file_bytes}")
    if len(data) < 8:
        raise TensorFileError("too short to be a safetensors file")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > limits.max_header_bytes or 8 + header_len > len(data):
        raise TensorFileError(f"header length {header_len} is out of bounds")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise TensorFileError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise TensorFileError("header must be a JSON object")
    if HEADER_METADATA_KEY in header:
        raise TensorFileError("header metadata is not allowed")
    if len(header) > limits.max_tensors:
        raise TensorFileError(f"{len(header)} tensors, over the limit of {limits.max_tensors}")
    body = len(data) - 8 - header_len
    spans: list[tuple[int, int]] = []
    total = 0
    specs: dict[str, tuple[list[int], np.dtype, int, int]] = {}
    for name, entry in header.items():
        _check_name(name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise TensorFileError(f"tensor {name!r}: entry must hold exactly dtype, shape "
                                  "and data_offsets")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if code not in DTYPES:
            raise TensorFileError(f"tensor {name!r} has dtype {code!r}; allowed: "
                                  f"{', '.join(DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > limits.max_dims
                or not all(type(d) is int and 0 <= d <= limits.max_elements for d in shape)):
            raise TensorFileError(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= body):
            raise TensorFileError(f"tensor {name!r} has invalid data offsets {offsets!r}")
        elements = int(np.prod(shape, dtype=np.int64)) if shape else 1
        total += elements
        if total > limits.max_elements:
            raise TensorFileError(f"more than {limits.max_elements} elements in all")
        if offsets[1] - offsets[0] != _expected_size(shape, DTYPES[code]):
            raise TensorFileError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for "
                                  f"shape {shape} of {code}")
        spans.append((offsets[0], offsets[1]))
        specs[name] = (shape, DTYPES[code], offsets[0], offsets[1])
    position = 0
    for start, end in sorted(spans):  # the data must be tiled exactly: no gaps, no overlaps
        if start != position:
            raise TensorFileError("tensor data overlaps or leaves gaps")
        position = end
    if position != body:
        raise TensorFileError(f"{body - position} trailing bytes after the tensor data")
    base = 8 + header_len
    tensors: Tensors = {}
    for name, (shape, dtype, start, end) in specs.items():
        array = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize,
                              offset=base + start).reshape(shape).copy()
        if dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise TensorFileError(f"tensor {name!r} holds NaN or infinity")
        tensors[name] = array
    if expected is not None:
        check_matches(tensors, expected)
    return tensors


def check_matches(tensors: Mapping[str, np.ndarray],
                  expected: Mapping[str, tuple[tuple[int, ...], str]]) -> None:
    """Require exactly the names, shapes and dtypes of ``expected`` (see :func:`spec_of`)."""
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise TensorFileError(f"tensors differ from the model: missing {missing}, "
                              f"unexpected {extra}")
    for name, (shape, dtype) in expected.items():
        array = tensors[name]
        if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            raise TensorFileError(f"tensor {name!r} is {array.dtype}{list(array.shape)}, "
                                  f"the model's is {np.dtype(dtype)}{list(shape)}")


def spec_of(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name to (shape, dtype name): what an update must match."""
    return {name: (tuple(a.shape), a.dtype.name) for name, a in tensors.items()}


def read_tensors(path: str | os.PathLike[str], limits: TensorLimits = DEFAULT_LIMITS,
                 expected: Mapping[str, tuple[tuple[int, ...], str]] | None = None) -> Tensors:
    """Read a tensor file strictly: a regular file (links refused, not followed) of at most
    ``limits.max_file_bytes``, then :func:`decode_tensors`."""
    try:
        # O_NONBLOCK: a FIFO planted in place of the file must not block the reader.
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as exc:
        raise TensorFileError(f"{os.fspath(path)} does not exist") from exc
    except OSError as exc:
        raise TensorFileError(f"{os.fspath(path)} cannot be opened safely: {exc}") from exc
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise TensorFileError(f"{os.fspath(path)} is not a regular file")
        if info.st_size > limits.max_file_bytes:
            raise TensorFileError(f"{info.st_size} bytes, over the limit of "
                                  f"{limits.max_file_bytes}")
        data = handle.read(limits.max_file_bytes + 1)
    return decode_tensors(data, limits, expected)
