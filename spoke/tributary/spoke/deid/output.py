"""A de-identified dataset as a DICOM file, hashed once and written once.

pydicom's ``save_as`` copies the pixel data twice on its way out (into a buffer to learn
its length, then out of it) and a content-addressed store then hashes the whole file
again. Here the header is encoded by pydicom, the pixel element's own header is built
from its length, and the pixel value goes from the dataset to the file in one ``writev``,
read once, by the one hash that both names the file and finds duplicate images:

- ``pixel_digest``: SHA-256 of the pixel data value (the same image under two headers);
- ``digest``: SHA-256 of the file with its pixel value replaced by ``pixel_digest``,
  followed by the length of what precedes it (so no two files share it without a
  SHA-256 collision); for a file without pixel data, the SHA-256 of the file itself.

Syntaxes the fast path does not cover (big endian, deflated) go through pydicom's writer
whole, and are named by the SHA-256 of the file."""

from __future__ import annotations

import hashlib
import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom.charset import default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag, tag_in_exception
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ImplicitVRLittleEndian

PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_DELIMITER = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_PREAMBLE = b"\0" * 128 + b"DICM"


@dataclass(frozen=True)
class Encoded:
    """A file as the chunks written in order; ``pixels`` is the index of the pixel value."""

    chunks: list[bytes | memoryview]
    pixels: int | None
    digest: str
    pixel_digest: str | None

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)

    def data(self) -> bytes:
        return b"".join(self.chunks)

    def write(self, fd: int) -> None:
        """All chunks to ``fd`` with as few system calls as the kernel allows."""
        pending = [memoryview(c) for c in self.chunks if len(c)]
        while pending:
            done = os.writev(fd, pending)
            while pending and done >= len(pending[0]):
                done -= len(pending[0])
                pending.pop(0)
            if pending and done:
                pending[0] = pending[0][done:]


def file_meta(ds: Dataset) -> FileMetaDataset:
    """The file meta group rebuilt from the dataset alone: the bytes do not depend on
    where the instance came from (a folder or a PACS)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def encode(ds: Dataset) -> Encoded:
    """Encode ``ds`` (whose ``file_meta`` names its transfer syntax) as a DICOM file with
    a zeroed preamble and a file meta group rebuilt from the dataset."""
    meta = file_meta(ds)
    ds.file_meta = meta
    syntax = meta.TransferSyntaxUID
    if not syntax.is_little_endian or syntax.is_deflated:
        return _whole(ds)
    implicit = syntax == ImplicitVRLittleEndian
    elements = ds._dict
    pixel = elements.get(PIXEL_DATA)  # type: ignore[call-overload]
    if pixel is None or not isinstance(pixel.value, bytes | bytearray):
        return _whole(ds)
    after = {t: elements.pop(t) for t in [t for t in elements if t > PIXEL_DATA]}
    del elements[PIXEL_DATA]  # type: ignore[arg-type]
    try:
        head = DicomBytesIO()
        head.write(_PREAMBLE)
        head.write(_meta_bytes(meta))
        head.is_little_endian, head.is_implicit_VR = True, implicit
        _write_body(head, ds, implicit)
        tail = b""
        if after:
            rest = Dataset(after)
            rest.set_original_encoding(*ds.original_encoding, ds.original_character_set)
            out = DicomBytesIO()
            out.is_little_endian, out.is_implicit_VR = True, implicit
            write_dataset(out, rest, ds._character_set)
            tail = out.getvalue()
    finally:
        elements[PIXEL_DATA] = pixel  # type: ignore[index]
        elements.update(after)  # type: ignore[arg-type]
    value = pixel.value
    undefined = pixel.length == _UNDEFINED if pixel.is_raw else pixel.is_undefined_length
    vr = str(pixel.VR or ("OB" if undefined else "OW"))
    if vr not in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        vr = "OW"
    pad = b"\0" if len(value) % 2 else b""
    length = _UNDEFINED if undefined else len(value) + len(pad)
    element = (struct.pack("<HHI", 0x7FE0, 0x0010, length) if implicit else
               struct.pack("<HH2s2xI", 0x7FE0, 0x0010, vr.encode(), length))
    trailer = pad + (_DELIMITER if undefined else b"")
    chunks: list[bytes | memoryview] = [head.getvalue() + element, value, trailer + tail]
    return _digested(chunks, 1)


#: VRs whose explicit-VR header has a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV",
                       "UV"})


def _write_body(fp: DicomBytesIO, ds: Dataset, implicit: bool) -> None:
    """pydicom's ``write_dataset``, except that an element still as it was read (raw,
    in the encoding being written, of defined length) is copied as its header and bytes
    without pydicom's per-element buffering: exactly the bytes pydicom writes for it.
    Anything else, and any change of encoding or character set, is pydicom's."""
    if ds.original_encoding != (implicit, True) or \
            ds.original_character_set != ds._character_set:
        write_dataset(fp, ds)
        return
    encoding = ds.get("SpecificCharacterSet", default_encoding)
    plain = _PLAIN_VRS if _single_byte(encoding) else _CHARSET_FREE_VRS
    write = fp.write
    # items, sorted as ints: pydicom's tags compare in Python, plain ints do not
    for tag, elem in sorted(ds._dict.items(), key=_tag_order):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:
            continue  # retired group lengths are not written (PS3.5 7.2)
        value = elem.value
        if type(elem) is RawDataElement and elem.length != _UNDEFINED and \
                type(value) is bytes and len(value) == elem.length and not elem.length % 2:
            if implicit:
                write(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, elem.length) + value)
                continue
            vr = elem.VR
            if vr and vr != "SQ":
                if vr in _LONG_VRS:
                    write(struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(),
                                      elem.length) + value)
                    continue
                if elem.length <= 0xFFFF:
                    write(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(),
                                      elem.length) + value)
                    continue
        elif type(elem) is DataElement and elem.VR in plain:
            text = _plain(value)
            if text is not None:
                data = text.encode("ascii")
                if len(data) % 2:
                    data += b"\0" if elem.VR == "UI" else b" "
                vr = elem.VR
                if implicit:
                    write(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(data)) + data)
                    continue
                if vr in _LONG_VRS:
                    write(struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode(),
                                      len(data)) + data)
                    continue
                if len(data) <= 0xFFFF:
                    write(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(),
                                      len(data)) + data)
                    continue
        with tag_in_exception(Tag(tag)):
            write_data_element(fp, ds.get_item(tag), encoding)  # converts empty raw values


def _tag_order(item: tuple[int, object]) -> int:
    return int(item[0])


#: VRs pydicom writes as the value's text, joined by backslashes and padded to even
#: length (with NUL for UI, a space otherwise): for ASCII text in a character set whose
#: ASCII is plain (no ISO 2022 code extensions), the bytes are the text's own.
_PLAIN_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "SH", "LO", "LT", "ST",
                        "UT", "UC", "UR"})
#: Of those, the VRs written in the default repertoire whatever the character set.
_CHARSET_FREE_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
_SINGLE_BYTE = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 192", "iso8859"})


def _single_byte(encoding: object) -> bool:
    values = list(encoding) if isinstance(encoding, MultiValue | list) else [encoding]
    return all(str(v or "").strip() in _SINGLE_BYTE for v in values)


def _plain(value: object) -> str | None:
    """``value`` as the text pydicom would write, or None when only pydicom knows."""
    if value is None:
        return ""
    if type(value) is str or type(value) is UID:
        text = str(value)
    elif type(value) is MultiValue or type(value) is list:
        if not all(type(v) is str or type(v) is UID for v in value):  # type: ignore[attr-defined]
            return None
        text = "\\".join(value)  # type: ignore[arg-type]
    else:
        return None
    return text if text.isascii() else None


def _digested(chunks: list[bytes | memoryview], pixels: int | None) -> Encoded:
    if pixels is None:
        digest = hashlib.sha256()
        for chunk in chunks:
            digest.update(chunk)
        return Encoded(chunks, None, digest.hexdigest(), None)
    pixel_digest = hashlib.sha256(chunks[pixels]).digest()
    digest = hashlib.sha256()
    before = 0
    for index, chunk in enumerate(chunks):
        if index == pixels:
            digest.update(pixel_digest)
        else:
            digest.update(chunk)
            before += len(chunk) if index < pixels else 0
    digest.update(struct.pack("<Q", before))
    return Encoded(chunks, pixels, digest.hexdigest(), pixel_digest.hex())


def _whole(ds: Dataset) -> Encoded:
    """pydicom's own writer, for the syntaxes the fast path leaves out: the file's own
    SHA-256 names it, and the pixel data is hashed apart for the duplicate check."""
    buffer = io.BytesIO()
    ds.preamble = b"\0" * 128
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    pixel = ds._dict.get(PIXEL_DATA)  # type: ignore[call-overload]
    value = pixel.value if pixel is not None else None
    return Encoded([data], None, hashlib.sha256(data).hexdigest(),
                   hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else None)


def digests_of_file(data: bytes) -> tuple[str, str | None]:
    """``(digest, pixel_digest)`` of a DICOM file already written, as :func:`encode` names
    what it writes: the pixel value found where the file holds it. A file the fast path
    would not write (big endian, deflated, no pixel bytes) is named by its own SHA-256."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    pixel = ds._dict.get(PIXEL_DATA)  # type: ignore[call-overload]
    value = pixel.value if pixel is not None else None
    if not isinstance(value, bytes):
        return hashlib.sha256(data).hexdigest(), None
    syntax = ds.file_meta.TransferSyntaxUID
    tell = getattr(pixel, "value_tell", None)
    if not syntax.is_little_endian or syntax.is_deflated or tell is None or \
            data[tell:tell + len(value)] != value:
        return hashlib.sha256(data).hexdigest(), hashlib.sha256(value).hexdigest()
    encoded = _digested([data[:tell], value, data[tell + len(value):]], 1)
    return encoded.digest, encoded.pixel_digest


def _meta_bytes(meta: FileMetaDataset) -> bytes:
    """The file meta group (always Explicit VR Little Endian), with its group length."""
    body = _element(0x0001, "OB", b"\0\x01")
    for element, keyword in ((0x0002, "MediaStorageSOPClassUID"),
                             (0x0003, "MediaStorageSOPInstanceUID"),
                             (0x0010, "TransferSyntaxUID"),
                             (0x0012, "ImplementationClassUID")):
        value = str(meta[keyword].value).encode("ascii")
        body += _element(element, "UI", value + b"\0" * (len(value) % 2))
    return _element(0x0000, "UL", struct.pack("<I", len(body))) + body


def _element(element: int, vr: str, value: bytes) -> bytes:
    if vr == "OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr.encode(), len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr.encode(), len(value)) + value


def write_new(path: Path, encoded: Encoded, mode: int = 0o444) -> None:
    """Write ``encoded`` to a new file ``path`` (never replacing one), with ``mode``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        encoded.write(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
