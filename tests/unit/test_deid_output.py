"""The one-pass writer (``tributary.spoke.deid.output``) writes what pydicom writes: for
every file bundled with pydicom, as read, as screened and de-identified (under the Basic
Profile and with every option), the data set's bytes equal ``save_as``'s, and the two
digests are what they claim to be."""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from pathlib import Path

import pydicom
import pytest

from tributary.spoke.deid import Deidentifier, DeidOptions, Screener
from tributary.spoke.deid.output import PIXEL_DATA, encode, file_meta
from tributary.spoke.pseudonyms import Pseudonymizer

FILES = sorted(p for p in (Path(pydicom.__file__).parent / "data" / "test_files").rglob("*")
               if p.is_file())
#: OCR is off: it does not change what is written, and it would make this test slow.
BASIC = DeidOptions(text_detection="off")
ALL = DeidOptions(retain_modified_dates=True, retain_patient_characteristics=True,
                  retain_device_identity=True, clean_descriptors=True, text_detection="off")


def _body(data: bytes) -> bytes:
    """What follows the preamble and the file meta group."""
    length = struct.unpack("<I", data[140:144])[0]
    return data[144 + length:]


def _readable(path: Path) -> pydicom.Dataset | None:
    try:
        ds = pydicom.dcmread(path)
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), ds.file_meta.TransferSyntaxUID
    except Exception:
        return None
    return ds


def _pydicom_bytes(ds: pydicom.Dataset) -> bytes | None:
    ds.file_meta = file_meta(ds)
    buffer = io.BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except Exception:
        return None
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["as read", "basic profile", "every option"])
def test_the_writer_writes_what_pydicom_writes(mode: str) -> None:
    warnings.simplefilter("ignore")
    pseudonyms = Pseudonymizer(b"k" * 32)
    options = ALL if mode == "every option" else BASIC
    compared = 0
    for path in FILES:
        if mode == "as read":
            ours = _readable(path)
        else:  # the pipelines' path: screened (values read, so converted), de-identified
            ours, _ = Screener(options, pseudonyms, hash_pixels=False).check(path)
            if ours is not None:
                try:
                    Deidentifier(pseudonyms, options).deidentify(ours, "c-test")
                except Exception:
                    continue
        if ours is None:
            continue
        expected = _pydicom_bytes(ours)  # the same data set, written by pydicom
        if expected is None:
            continue  # pydicom cannot write it either (e.g. SC_rgb_jpeg.dcm)
        encoded = encode(ours)
        data = encoded.data()
        assert _body(data) == _body(expected), path.name
        assert data[:132] == b"\0" * 128 + b"DICM"
        back = pydicom.dcmread(io.BytesIO(data))
        assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
        pixels = back.get(PIXEL_DATA)
        if pixels is not None and encoded.pixels is not None:
            assert encoded.pixel_digest == hashlib.sha256(pixels.value).hexdigest()
            start = data.index(pixels.value)
            digest = hashlib.sha256(data[:start] + bytes.fromhex(encoded.pixel_digest)
                                    + data[start + len(pixels.value):]
                                    + struct.pack("<Q", start)).hexdigest()
            assert encoded.digest == digest, path.name
        elif encoded.pixels is None:
            assert encoded.digest == hashlib.sha256(data).hexdigest()
        compared += 1
    assert compared > 60


def test_the_file_is_written_in_one_piece(tmp_path: Path) -> None:
    from tributary.spoke.deid.output import write_new

    ds = _readable(next(p for p in FILES if p.name == "CT_small.dcm"))
    assert ds is not None
    encoded = encode(ds)
    target = tmp_path / "out.dcm"
    write_new(target, encoded)
    assert target.read_bytes() == encoded.data()
    assert target.stat().st_mode & 0o777 == 0o444
    with pytest.raises(FileExistsError):  # never replaces a file
        write_new(target, encoded)
