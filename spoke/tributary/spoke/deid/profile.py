"""The PS3.15 Table E.1-1 action table, compiled once per set of options.

The Basic Profile column is the maintained ``dicom-anonymizer`` table (edition in
:data:`BASIC_EDITION`); the option columns come from ``ps315_options.json``, extracted from
the standard's published table by ``scripts/extract_ps315_options.py`` (scrape date in
:data:`OPTIONS_EDITION`). Nothing here is typed by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, NamedTuple

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.datadict import DicomDictionary

from tributary.spoke.deid.options import DeidOptions

BASIC_EDITION = "dicomfields_2026c"
_OPTIONS = json.loads(resources.files(__package__).joinpath("ps315_options.json").read_text())
OPTIONS_EDITION = f"PS3.15 E.1-1 options as published {_OPTIONS['scraped']}"

# dicom-anonymizer's table names -> the action code of Table E.1-1.
_BASIC_COLUMNS = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U",
                  "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D",
                  "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
_OPTION_FLAGS = {"retain_modified_dates": "113107", "retain_patient_characteristics": "113108",
                 "retain_device_identity": "113109", "clean_descriptors": "113105",
                 "retain_safe_private": "113111", "retain_institution_identity": "113112"}
#: CID 7050 as pydicom's code dictionary has it (value, scheme, meaning), copied so that a
#: run does not load the 60 ms dictionary for eight codes; a unit test compares the two.
CODES = {
    "113100": ("113100", "DCM", "Basic Application Confidentiality Profile"),
    "113101": ("113101", "DCM", "Clean Pixel Data Option"),
    "113105": ("113105", "DCM", "Clean Descriptors Option"),
    "113107": ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates "
                                "Option"),
    "113108": ("113108", "DCM", "Retain Patient Characteristics Option"),
    "113109": ("113109", "DCM", "Retain Device Identity Option"),
    "113111": ("113111", "DCM", "Retain Safe Private Option"),
    "113112": ("113112", "DCM", "Retain Institution Identity Option"),
}
#: The same codes' names in pydicom's dictionary (``codes.DCM.<name>``).
CODE_NAMES = {
    "113100": "BasicApplicationConfidentialityProfile",
    "113101": "CleanPixelDataOption",
    "113105": "CleanDescriptorsOption",
    "113107": "RetainLongitudinalTemporalInformationModifiedDatesOption",
    "113108": "RetainPatientCharacteristicsOption",
    "113109": "RetainDeviceIdentityOption",
    "113111": "RetainSafePrivateOption",
    "113112": "RetainInstitutionIdentityOption",
}
#: Tags whose dictionary VR is UI or SQ: attributes the table does not list are still
#: remapped (UIDs) or walked into (sequences), so no instance UID or nested identifier
#: survives just because its attribute is missing from the table.
UI_TAGS = frozenset(t for t, entry in DicomDictionary.items() if entry[0] == "UI")
SQ_TAGS = frozenset(t for t, entry in DicomDictionary.items() if entry[0] == "SQ")


class OptionCode(NamedTuple):
    """A CID 7050 code, as pydicom's ``Code`` names its parts."""

    value: str
    scheme_designator: str
    meaning: str


def option_code(code: str) -> OptionCode:
    """The PS3.16 CID 7050 code (value and meaning as in pydicom's code dictionary)."""
    return OptionCode(*CODES[code])


@dataclass(frozen=True)
class ActionTable:
    """Single tags -> action, plus masked rules for the repeating groups 50xx and 60xx."""

    single: dict[int, str]
    masked: tuple[tuple[int, int, str], ...]  # (mask, value, action)
    private: str  # "X", or "C" under Retain Safe Private

    def repeating(self, tag: int) -> str | None:
        for mask, value, action in self.masked:
            if tag & mask == value:
                return action
        return None


def _parse_rule_key(key: str) -> tuple[int, int]:
    """'60xx4000' -> (mask, value)."""
    mask = int("".join("0" if c == "x" else "f" for c in key), 16)
    return mask, int(key.replace("x", "0"), 16)


def _basic() -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    tables: dict[str, Any] = dicom_anonymization_database_selector(BASIC_EDITION)
    single: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for column, action in _BASIC_COLUMNS.items():
        for entry in tables[column]:
            if len(entry) == 2:
                single[(entry[0] << 16) | entry[1]] = action
            else:
                group, element, gmask, emask = entry
                masked.append(((gmask << 16) | emask, (group << 16) | element, action))
    return single, masked


@cache
def action_table(options: DeidOptions) -> ActionTable:
    single, masked = _basic()
    private = "X"
    # Where two chosen options name one attribute, retaining (K) wins over cleaning (C).
    chosen = [c for flag, c in _OPTION_FLAGS.items() if getattr(options, flag)]
    overrides: dict[str, str] = {}
    for code in chosen:
        for key, action in _OPTIONS["columns"][code]["rules"].items():
            if overrides.get(key) != "K":
                overrides[key] = action
    for key, action in overrides.items():
        if key == "private":
            private = action
        elif "x" in key:
            mask, value = _parse_rule_key(key)
            masked = [(mask, value, action)] + [m for m in masked if m[:2] != (mask, value)]
        else:
            single[int(key, 16)] = action
    # Group length elements are not in the table; their values go stale once elements are
    # removed, so they go too (the writer recreates the file meta group's own).
    return ActionTable(single=single, masked=tuple(masked), private=private)


def profile_name(options: DeidOptions) -> str:
    """Human-readable and recorded in custody records: profile, options and editions."""
    names = [option_code(c).meaning for c in options.option_codes()[1:]]
    text = f"PS3.15 E.1 Basic Profile ({BASIC_EDITION}"
    text += f"; options {_OPTIONS['scraped']})" if names else ")"
    if names:
        text += " with " + ", ".join(names)
    if options.retain_safe_private:
        text += f" ({len(options.safe_private)} safe private attributes)"
    else:
        text += ", private tags removed"
    if options.clean_pixel_data:
        text += f" ({len(options.pixel_masks)} pixel masks)"
    if options.allow_burned_in:
        text += ", burned-in annotation allowed"
    return text
