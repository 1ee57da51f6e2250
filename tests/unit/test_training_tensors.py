"""The training contract's tensor file: round trip, and hostile files refused."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from tributary.protocol.training.tensors import (
    TensorFileError,
    TensorLimits,
    decode_tensors,
    encode_tensors,
    read_tensors,
    spec_of,
    write_tensors,
)


def _raw(header: dict, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def test_round_trip_keeps_names_dtypes_shapes_and_values(tmp_path: Path) -> None:
    params = {"layer1.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
              "layer1.bias": np.array([0.5, -1.5], dtype=np.float64),
              "steps": np.array(7, dtype=np.int64),
              "masked/sum": np.array([2**40, 3], dtype=np.uint64)}
    path = write_tensors(tmp_path / "p.safetensors", params)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    back = read_tensors(path, expected=spec_of(params))
    assert spec_of(back) == spec_of(params)
    for name, array in params.items():
        np.testing.assert_array_equal(back[name], array)
        assert back[name].dtype == array.dtype


def test_big_endian_input_is_written_little_endian() -> None:
    params = {"w": np.array([1.0, 2.0], dtype=">f4")}
    back = decode_tensors(encode_tensors(params))
    assert back["w"].dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back["w"], [1.0, 2.0])


@pytest.mark.parametrize("params, needle", [
    ({"w": np.array([1.0], dtype=np.float16)}, "dtype"),
    ({"w": np.array([True])}, "dtype"),
    ({"w": np.array(["a"])}, "dtype"),
    ({"w": np.array([{"x": 1}], dtype=object)}, "dtype"),
    ({"w": np.array([np.nan])}, "NaN"),
    ({"bad name": np.zeros(1)}, "name"),
    ({"../etc/passwd": np.zeros(1)}, "name"),
    ({"w": np.zeros([1] * 9)}, "dimensions"),
])
def test_writing_refuses_what_the_format_does_not_allow(params: dict, needle: str) -> None:
    with pytest.raises(TensorFileError, match=needle):
        encode_tensors(params)


def test_pickle_and_npz_are_refused() -> None:
    import io
    import pickle

    with pytest.raises(TensorFileError):
        decode_tensors(pickle.dumps({"w": np.zeros(3)}))
    buffer = io.BytesIO()
    np.savez(buffer, w=np.zeros(3))
    with pytest.raises(TensorFileError):
        decode_tensors(buffer.getvalue())


@pytest.mark.parametrize("data, needle", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    (struct.pack("<Q", 4) + b"{}", "header length"),
    (struct.pack("<Q", 2) + b"\xff\xfe", "not valid JSON"),
    (_raw([]), "JSON object"),  # type: ignore[arg-type]
    (_raw({"__metadata__": {"a": "b"}}), "metadata"),
    (_raw({"w": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0"), "dtype"),
    (_raw({"w": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "dtype"),
    (_raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "shape"),
    (_raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "bytes"),
    (_raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 4), "offsets"),
    (_raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "trailing"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "overlaps"),
    (_raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4),
     "exactly"),
    (_raw({"w x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "name"),
    (_raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
          struct.pack("<f", float("inf"))), "NaN or infinity"),
])
def test_hostile_files_are_refused(data: bytes, needle: str) -> None:
    with pytest.raises(TensorFileError, match=needle):
        decode_tensors(data)


def test_limits_are_enforced() -> None:
    data = encode_tensors({"a": np.zeros(100), "b": np.zeros(100)})
    with pytest.raises(TensorFileError, match="over the limit"):
        decode_tensors(data, TensorLimits(max_file_bytes=100))
    with pytest.raises(TensorFileError, match="tensors, over"):
        decode_tensors(data, TensorLimits(max_tensors=1))
    with pytest.raises(TensorFileError, match="elements"):
        decode_tensors(data, TensorLimits(max_elements=150))
    # a shape claiming a huge element count is refused before any allocation
    huge = _raw({"w": {"dtype": "F64", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 8]}},
                b"\0" * 8)
    with pytest.raises(TensorFileError):
        decode_tensors(huge)


def test_an_update_must_match_the_global_model() -> None:
    model = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    for update, needle in [({"w": np.zeros((2, 3), dtype=np.float32)}, "missing"),
                           ({**model, "extra": np.zeros(1)}, "unexpected"),
                           ({**model, "w": np.zeros((3, 2), dtype=np.float32)}, "model's"),
                           ({**model, "b": np.zeros(3, dtype=np.float64)}, "model's")]:
        with pytest.raises(TensorFileError, match=needle):
            decode_tensors(encode_tensors(update), expected=spec_of(model))


def test_links_fifos_and_oversized_files_are_not_read(tmp_path: Path) -> None:
    real = write_tensors(tmp_path / "real.safetensors", {"w": np.zeros(4)})
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    with pytest.raises(TensorFileError, match="safely"):
        read_tensors(link)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(TensorFileError, match="regular file"):
        read_tensors(fifo)
    with pytest.raises(TensorFileError, match="over the limit"):
        read_tensors(real, TensorLimits(max_file_bytes=16))
    with pytest.raises(TensorFileError, match="does not exist"):
        read_tensors(tmp_path / "absent")
