"""Elements written with VR UN whose attribute the dictionary knows: decoded by their
dictionary VR before the profile is applied, so nothing hides behind UN.

A sequence stored as UN keeps its raw bytes in pydicom until someone decodes it, and the
engine never decodes what the profile keeps; names and IDs inside its items would pass
untouched. PS3.5 6.2.2 says such a value is Implicit VR Little Endian whatever the transfer
syntax; pydicom decodes it in the file's own encoding (wrong for big endian) and leaves
values of 64 KiB or more as UN. Here the standard's encoding is tried first, then the file's;
a value that neither decodes is reported so the engine removes it."""

from __future__ import annotations

from pydicom.charset import default_encoding
from pydicom.datadict import DicomDictionary
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.values import convert_SQ


class Undecodable(ValueError):
    """A UN value that cannot be decoded by its dictionary VR."""


def known_vr(tag: int) -> str | None:
    """The dictionary VR of a standard attribute, when it is a single VR."""
    entry = DicomDictionary.get(tag)
    if entry is None or " or " in entry[0] or entry[0] == "UN":
        return None
    return entry[0]


def resolve_un(ds: Dataset) -> list[int]:
    """Replace, at this level of ``ds``, every public element stored as UN whose
    attribute has a dictionary VR by the element decoded with it. Returns the tags that
    could not be decoded (left in place: the caller removes them)."""
    elements = ds._dict
    failed: list[int] = []
    for tag in [tag for tag, elem in elements.items() if elem.VR == "UN"]:
        t, elem = int(tag), elements[tag]
        if (t >> 16) & 1:
            continue
        vr = known_vr(t)
        if vr is None:
            continue
        try:
            elements[tag] = _decode(ds, t, vr, elem)  # type: ignore[index]
        except Exception:  # hostile bytes: report, never guess
            failed.append(t)
    return failed


def _decode(ds: Dataset, tag: int, vr: str, elem: DataElement | RawDataElement
            ) -> DataElement:
    value = elem.value
    if value is None:
        value = b""
    if not isinstance(value, bytes):
        raise Undecodable(f"{tag:08X}: UN value is not bytes")
    implicit, little = _encoding(ds, elem)
    # The encodings in force for this item (its own or its parents' character set).
    charset = getattr(ds, "_character_set", None) or [default_encoding]
    if vr == "SQ":
        last: Exception | None = None
        for encoding in ((True, True), (implicit, little)):
            try:
                seq = convert_SQ(value, *encoding, charset)
                _check(seq)
                return DataElement(tag, "SQ", seq)
            except Exception as exc:
                last = exc
        raise Undecodable(f"{tag:08X}: not a sequence in any encoding: {last}")
    raw = RawDataElement(tag, vr, len(value), value, 0, implicit, little)
    return convert_raw_data_element(raw, encoding=charset, ds=ds)


def _encoding(ds: Dataset, elem: DataElement | RawDataElement) -> tuple[bool, bool]:
    if isinstance(elem, RawDataElement):
        return bool(elem.is_implicit_VR), bool(elem.is_little_endian)
    implicit, little = getattr(ds, "original_encoding", (False, True))
    return bool(implicit), little is not False


def _check(seq: Sequence) -> None:
    """Decode every element of every item (raises on garbage), nested UN included."""
    for item in seq:
        failed = resolve_un(item)
        if failed:
            raise Undecodable(f"nested UN {failed[0]:08X} cannot be decoded")
        for elem in item.iterall():
            if elem.VR == "UN" and not (elem.tag.group & 1) and known_vr(int(elem.tag)):
                raise Undecodable(f"{int(elem.tag):08X}: still UN")
