"""The de-identification engine: one pass over a dataset applying the compiled PS3.15
action table, recursing into every sequence.

Speed comes from leaving elements alone: pydicom keeps undecoded (raw) elements until
they are touched, and an attribute the table keeps is never decoded; the table is a dict
lookup per element, and UID remapping is cached."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

from pydicom import config
from pydicom import uid as uids
from pydicom.datadict import DicomDictionary, mask_match
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue

from tributary.spoke.deid.options import DeidOptions
from tributary.spoke.deid.pixels import clean_pixels
from tributary.spoke.deid.profile import (
    BASIC_EDITION,
    SQ_TAGS,
    UI_TAGS,
    ActionTable,
    action_table,
    option_code,
    profile_name,
)
from tributary.spoke.deid.unknown_vr import resolve_un
from tributary.spoke.pseudonyms import Pseudonymizer

DEID_METHOD = f"Tributary PS3.15 Basic Profile ({BASIC_EDITION})"  # LO: at most 64 chars
PATIENT_ID, PATIENT_NAME = 0x00100020, 0x00100010
#: "X unless Z, D or U is needed for conformance": the element is kept in its emptied or
#: dummy form, which loses nothing and keeps every IOD's Type 1 and 2 attributes present.
_RESOLVE = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U*"}
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_NUMBER_VRS = frozenset({"FL", "FD", "SL", "SS", "SV", "UL", "US", "UV", "AT"})
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000D",
          "IS": "0", "DS": "0", "SH": "ANONYMIZED", "LO": "ANONYMIZED", "CS": "ANONYMIZED",
          "PN": "ANONYMIZED", "AE": "ANONYMIZED"}
_WELL_KNOWN = frozenset(uids.UID_dictionary)
_STRICT_VRS = frozenset({"AE", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})
#: Code Sequence Macro attributes (PS3.3 Table 8.8-1): concepts, never identities.
_CODE_TAGS = frozenset(range(0x00080100, 0x00080123))  # SOP classes, transfer syntaxes, ...


class Deidentifier:
    """De-identifies datasets with one spoke key and one set of options. Reuse it: it
    caches the compiled table and the UID mapping."""

    def __init__(self, pseudonyms: Pseudonymizer, options: DeidOptions | None = None) -> None:
        self.pseudonyms = pseudonyms
        self.options = options or DeidOptions()
        self.table: ActionTable = action_table(self.options)
        self.profile = profile_name(self.options)
        self._uids: dict[str, str] = {}
        self._safe = {(s.creator.strip(), s.group, s.element) for s in self.options.safe_private}
        self._scrub_text = any((self.options.clean_descriptors,
                                self.options.retain_patient_characteristics,
                                self.options.retain_device_identity))
        #: Of the last :meth:`deidentify`: standard-group attributes no dictionary knows,
        #: and UN values that could not be decoded by their attribute's VR, as
        #: "(GGGG,EEEE)"; each was removed (PS3.15 cannot vouch for what it does not name).
        self.removed_unknown: list[str] = []
        self.removed_undecodable: list[str] = []
        self._marked: list[tuple[int, str, object]] | None = None
        self._codes: list[Dataset] | None = None

    # -- public -----------------------------------------------------------------------

    def deidentify(self, ds: Dataset, case_id: str) -> Dataset:
        """De-identify ``ds`` in place (and return it) as the case ``case_id``."""
        self.removed_unknown, self.removed_undecodable = [], []
        mask = self.options.pixel_mask_for(ds)  # matched on the device, before cleaning
        if mask is not None:
            clean_pixels(ds, mask)
        shift = self.pseudonyms.date_shift_days(case_id)
        secrets = self._secrets(ds) if self._scrub_text else None
        self._clean(ds, case_id, shift, secrets)
        self._mark(ds, case_id)
        self._file_meta(ds)
        return ds

    def uid(self, value: str) -> str:
        value = value.strip("\0 ")
        if not value or value in _WELL_KNOWN:
            return value
        new = self._uids.get(value)
        if new is None:
            new = self._uids[value] = self.pseudonyms.uid(value)
        return new

    # -- the pass ---------------------------------------------------------------------

    def _clean(self, ds: Dataset, case_id: str, shift: int, secrets: re.Pattern | None,
               strict: bool = False) -> None:
        """``strict``: inside a sequence the table replaces by a dummy (Content Sequence,
        Graphic Annotation Sequence...). The table lists no attribute of their items, so
        there every free-text, name and date attribute is replaced too; codes, numbers
        and (remapped) UIDs stay, and so does the structure."""
        table, single = self.table, self.table.single
        self._resolve(ds)
        elements = ds._dict
        private_tags: list[int] = []
        for tag in list(elements):
            t = int(tag)
            group = t >> 16
            if group & 1:
                private_tags.append(t)
                continue
            if t & 0xFFFF == 0 and group != 0x0002:  # stale group length
                del elements[tag]
                continue
            action = single.get(t)
            if action is None and (group & 0xFF00) in (0x5000, 0x6000):
                action = table.repeating(t)
                if action == "X" and (group & 0xFF00) == 0x6000:
                    # An overlay's data going means the whole overlay goes, so no
                    # half-defined overlay is left behind.
                    self._drop_group(ds, group)
                    continue
            if action is None:
                if t not in DicomDictionary and group != 0x0002 and not mask_match(t):
                    self.removed_unknown.append(_tag_text(t))
                    del elements[tag]
                    continue
                if t in UI_TAGS:
                    action = "U"
                elif t in SQ_TAGS or _vr(elements[tag]) == "SQ":
                    action = "K"
                elif strict and _vr(elements[tag]) in _STRICT_VRS and t not in _CODE_TAGS:
                    action = "D"
                else:
                    continue
            self._apply(ds, t, _RESOLVE.get(action, action), case_id, shift, secrets, strict)
        if private_tags:
            self._private(ds, private_tags, case_id, shift, secrets, strict)

    def _apply(self, ds: Dataset, tag: int, action: str, case_id: str, shift: int,
               secrets: re.Pattern | None, strict: bool) -> None:
        elements = ds._dict
        if action == "X":
            del elements[tag]
            return
        current = elements[tag]  # type: ignore[index]
        vr = _vr(current)
        if vr == "SQ":
            sequence = ds[tag]
            if action == "Z":
                sequence.value = []
            else:  # K, C, D, U*: the sequence stays, its items are cleaned
                for item in sequence.value:
                    self._clean(item, case_id, shift, secrets, strict or action == "D")
            return
        if action == "K":
            return
        # Replacements are built directly, without decoding the old value unless it is
        # needed (UIDs, identifiers, text to clean): this is most of the engine's speed.
        if action == "U" or action == "U*":
            if vr == "UI":
                value = _uid_text(current)
                new: object = _map(value, self.uid) if value else value
            else:
                new = "" if vr in _TEXT_VRS else None
        elif action == "Z":
            new = "" if vr in _TEXT_VRS else None
        elif action == "D":
            needs_old = vr in ("UI", "SH", "LO") and tag not in (PATIENT_ID, PATIENT_NAME)
            old = (_uid_text(current) if vr == "UI" else ds[tag].value) if needs_old else None
            new = self._dummy(tag, vr, old, case_id)
        elif action == "C":
            old = ds[tag].value
            if vr in ("DA", "DT") and old:
                new = _map(old, lambda v: _shift(v, vr, shift))
            elif vr in _TEXT_VRS and secrets is not None and old:
                new = _map(old, lambda v: secrets.sub("", v))
            else:
                return
        else:
            raise ValueError(f"unknown action {action!r} for {tag:08X}")
        elements[tag] = DataElement(tag, vr, new, validation_mode=config.IGNORE)  # type: ignore[index]

    def _dummy(self, tag: int, vr: str, value: object, case_id: str) -> object:
        if tag in (PATIENT_ID, PATIENT_NAME):
            return case_id
        if vr == "UI":
            return _map(value, self.uid) if value else self.pseudonyms.uid(f"dummy:{tag}")
        if vr in ("SH", "LO") and value:
            # Identifiers become keyed pseudonyms: repeated submissions still link up.
            size = 16 if vr == "SH" else 64
            return _map(value, lambda v: self.pseudonyms.identifier(str(v), size))
        if vr in _NUMBER_VRS:
            return 0
        if vr in _BYTES_VRS:
            return b"\0\0"
        return _DUMMY.get(vr, "ANONYMIZED")

    def _private(self, ds: Dataset, tags: list[int], case_id: str, shift: int,
                 secrets: re.Pattern | None, strict: bool) -> None:
        elements = ds._dict
        keep: set[int] = set()
        if self.table.private == "C" and self._safe:
            creators = {}
            for t in tags:
                if 0x10 <= t & 0xFFFF <= 0xFF:
                    creators[(t >> 16, t & 0xFF)] = str(ds[t].value).strip()
            for t in tags:
                element = t & 0xFFFF
                if element < 0x1000:
                    continue
                block = (t >> 16, element >> 8)
                if (creators.get(block), t >> 16, element & 0xFF) in self._safe:
                    keep.update((t, (block[0] << 16) | block[1]))
        for t in tags:
            if t not in keep:
                del elements[t]
            elif ds[t].VR == "SQ":
                for item in ds[t].value:
                    self._clean(item, case_id, shift, secrets, strict)

    def _resolve(self, ds: Dataset) -> None:
        """Elements stored as UN are decoded by their dictionary VR (a sequence is then
        walked like any other); a value that does not decode goes."""
        for t in resolve_un(ds):
            del ds._dict[t]  # type: ignore[arg-type]
            self.removed_undecodable.append(_tag_text(t))

    def _drop_group(self, ds: Dataset, group: int) -> None:
        for tag in [t for t in ds._dict if t >> 16 == group]:
            del ds._dict[tag]

    # -- scrubbing descriptions --------------------------------------------------------

    def _secrets(self, ds: Dataset) -> re.Pattern | None:
        """Every identifying text value in the instance (what the table removes or
        replaces, every date, every private text), to be cut out of the descriptions an
        option keeps. Only those elements are decoded."""
        found: set[str] = set()
        self._collect(ds, found)
        found = {f for f in found if len(f) >= 3}
        if not found:
            return None
        return re.compile("|".join(re.escape(f) for f in sorted(found, key=len, reverse=True)),
                          re.IGNORECASE)

    def _collect(self, ds: Dataset, found: set[str]) -> None:
        single = self.table.single
        self._resolve(ds)
        for tag, raw in list(ds._dict.items()):
            vr = _vr(raw)
            t = int(tag)
            if vr == "SQ":
                for item in ds[t].value or ():
                    self._collect(item, found)
                continue
            if vr in ("DA", "DT") or (vr in _TEXT_VRS and (
                    (t >> 16) & 1 or single.get(t, "K") not in ("K", "C"))):
                elem = ds[t]
                for value in _values(elem.value):
                    text = str(value).strip()
                    found.add(text)
                    if vr == "PN":
                        found.update(re.split(r"[\^= ]+", text))

    # -- what the standard asks to record ------------------------------------------------

    def _mark(self, ds: Dataset, case_id: str) -> None:
        ds.PatientID = case_id
        ds.PatientName = case_id
        elements = ds._dict
        for tag, vr, value in self._marks():
            elem = DataElement(tag, vr, value, validation_mode=config.IGNORE)
            elements[elem.tag] = elem  # keyed by pydicom's tag type, as pydicom expects
        elem = DataElement(0x00120064, "SQ",
                           [_copy_item(item) for item in self._method_codes()])
        elements[elem.tag] = elem

    def _marks(self) -> list[tuple[int, str, object]]:
        """PatientIdentityRemoved, DeidentificationMethod and
        LongitudinalTemporalInformationModified: the same for every instance."""
        if self._marked is None:
            codes = self.options.option_codes()
            self._marked = [
                (0x00120062, "CS", "YES"),
                (0x00120063, "LO", DEID_METHOD if len(codes) == 1 else
                 [DEID_METHOD, "options " + " ".join(codes[1:])]),
                (0x00280303, "CS", "MODIFIED" if self.options.retain_modified_dates
                 else "REMOVED")]
        return self._marked

    def _method_codes(self) -> list[Dataset]:
        """DeidentificationMethodCodeSequence's items, built once (each instance gets
        copies of them)."""
        if self._codes is None:
            self._codes = []
            for code in self.options.option_codes():
                item = Dataset()
                concept = option_code(code)
                item.CodeValue = concept.value
                item.CodingSchemeDesignator = concept.scheme_designator
                item.CodeMeaning = concept.meaning
                self._codes.append(item)
        return self._codes

    def _file_meta(self, ds: Dataset) -> None:
        """A fresh file meta group: nothing of the source's (AE titles, implementation)
        survives, and the instance UID matches the remapped one."""
        old = getattr(ds, "file_meta", None) or FileMetaDataset()
        meta = FileMetaDataset()
        sop_class = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
        if sop_class:
            meta.MediaStorageSOPClassUID = sop_class
        if "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        elif old.get("MediaStorageSOPInstanceUID"):  # e.g. a DICOMDIR
            meta.MediaStorageSOPInstanceUID = self.uid(str(old.MediaStorageSOPInstanceUID))
        syntax = old.get("TransferSyntaxUID")
        if syntax is None:
            implicit, little = getattr(ds, "original_encoding", (False, True))
            syntax = (uids.ImplicitVRLittleEndian if implicit else
                      uids.ExplicitVRLittleEndian if little else uids.ExplicitVRBigEndian)
        meta.TransferSyntaxUID = syntax
        meta.ImplementationClassUID = uids.PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        if hasattr(ds, "preamble"):
            ds.preamble = b"\0" * 128  # a preamble can carry a whole TIFF header


def _copy_item(item: Dataset) -> Dataset:
    """A fresh item with the same (immutable, text) elements: no two instances share one."""
    copy = Dataset()
    for tag, elem in item._dict.items():
        copy._dict[tag] = DataElement(tag, elem.VR, elem.value, validation_mode=config.IGNORE)
    return copy


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _vr(elem: DataElement | RawDataElement) -> str:
    if elem.VR:
        return str(elem.VR)
    entry = DicomDictionary.get(int(elem.tag))
    return entry[0] if entry else "UN"


def _uid_text(elem: DataElement | RawDataElement) -> str | list[str]:
    """A UI value without pydicom's conversion and validation (ASCII by definition)."""
    value = elem.value
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return [str(v) for v in value]
    text = str(value).strip("\0 ")
    return text.split("\\") if "\\" in text else text


def _values(value: object) -> Iterable[object]:
    if value is None:
        return ()
    if isinstance(value, (list, MultiValue)):
        return value
    return (value,)


def _map(value: object, fn):  # type: ignore[no-untyped-def]
    if isinstance(value, (list, MultiValue)):
        return [fn(str(v)) for v in value]
    return fn(str(value))


def _shift(value: str, vr: str, days: int) -> str:
    """Shift a DA (or range) or the date part of a DT by whole days; a partial date that
    cannot be shifted exactly is removed."""
    value = value.strip()
    if vr == "DA" and "-" in value:
        return "-".join(_shift(v, vr, days) if v else "" for v in value.split("-"))
    head, tail = value[:8], value[8:]
    if len(head) < 8 or not head.isdigit():
        return ""
    try:
        day = dt.date(int(head[:4]), int(head[4:6]), int(head[6:8])) + dt.timedelta(days)
    except ValueError:
        return ""
    return day.strftime("%Y%m%d") + (tail if vr == "DT" else "")
