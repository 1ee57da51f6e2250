"""The de-identification engine: PS3.15 profile and options applied everywhere (nested
sequences, private blocks, file meta), checked by scanning every output byte; pseudonyms
and date shifts stable across runs; outputs still valid DICOM with unchanged pixels."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import pydicom
import pytest
from deid_samples import identifying_values, patient_instance
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID_dictionary

from tributary.spoke.deid import (
    DEID_METHOD,
    Deidentifier,
    DeidOptions,
    SafePrivate,
    action_table,
)
from tributary.spoke.pseudonyms import Pseudonymizer

ALL_OPTIONS = DeidOptions(retain_modified_dates=True, retain_patient_characteristics=True,
                          retain_device_identity=True, clean_descriptors=True,
                          retain_safe_private=True)
OPTION_SETS = {"basic": DeidOptions(), "all-options": ALL_OPTIONS}
TEXT_VRS = {"AE", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}


def readable_test_files() -> list[Path]:
    """Every file bundled with pydicom (never downloaded) that pydicom reads as DICOM."""
    found = []
    for name in get_testdata_files():
        path = Path(name)
        if not path.is_file():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:
                try:
                    ds = pydicom.dcmread(path, force=True)
                except Exception:
                    continue
                if "SOPClassUID" not in ds:
                    continue
            except Exception:
                continue
            try:
                list(ds.iterall())
            except Exception:
                continue
        found.append(path)
    return found


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path)
        except InvalidDicomError:
            return pydicom.dcmread(path, force=True)


def secrets_of(ds: Dataset, options: DeidOptions) -> set[str]:
    """Values the profile removes or replaces (public attributes whose action is not K or
    C, every private value, every instance UID) and that no kept attribute also holds."""
    table = action_table(options)
    secret: set[str] = set()
    kept: list[str] = []
    everything = list(ds.iterall()) + (list(ds.file_meta) if hasattr(ds, "file_meta") else [])
    for elem in everything:
        if elem.VR not in TEXT_VRS or elem.value is None or elem.tag == 0x00020012:
            continue  # (the implementation class names software, not an instance)
        values = elem.value if isinstance(elem.value, list | pydicom.multival.MultiValue) \
            else [elem.value]
        texts = [str(v).strip("\0 ") for v in values]
        t = int(elem.tag)
        action = table.single.get(t) or table.repeating(t)
        if elem.tag.is_private or (action and action not in ("K", "C")) or (
                elem.VR == "UI" and action not in ("K", "C")):
            if elem.VR == "UI":
                texts = [v for v in texts if v not in UID_dictionary]
            if elem.VR in ("DA", "DT") and options.retain_modified_dates:
                texts = []  # shifted, checked separately
            secret.update(v for v in texts if len(v) >= 6)
        else:
            kept.extend(texts)
    kept_text = "\n".join(kept)
    return {s for s in secret if (s not in kept_text and not s.isdigit()) or (len(s) >= 8
            and s not in kept_text)}


def leaks(output: bytes, secrets: set[str]) -> list[str]:
    found = []
    for secret in secrets:
        raw = secret.encode("latin-1", "ignore")
        if re.fullmatch(rb"[0-9.]+", raw):  # a UID or number: only whole ones count
            if re.search(rb"(?<![0-9.])" + re.escape(raw) + rb"(?![0-9.])", output):
                found.append(secret)
        elif raw in output:
            found.append(secret)
    return found


def deidentify_bytes(deid: Deidentifier, ds: Dataset, case_id: str) -> bytes:
    deid.deidentify(ds, case_id)
    buffer = io.BytesIO()
    meta = ds.file_meta
    ds.save_as(buffer, enforce_file_format=bool(meta.get("MediaStorageSOPClassUID")
                                                and meta.get("MediaStorageSOPInstanceUID")))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pseudonyms(tmp_path_factory: pytest.TempPathFactory) -> Pseudonymizer:
    return Pseudonymizer.from_key_file(tmp_path_factory.mktemp("key") / "pseudonym.key")


@pytest.mark.parametrize("option_set", OPTION_SETS)
def test_every_pydicom_test_file_is_deidentified(option_set: str,
                                                 pseudonyms: Pseudonymizer) -> None:
    options = OPTION_SETS[option_set]
    deid = Deidentifier(pseudonyms, options)
    files = readable_test_files()
    assert len(files) > 100
    problems = []
    checked = 0
    for path in files:
        ds = read(path)
        secrets = secrets_of(ds, options)
        checked += len(secrets)
        pixels = ds.get("PixelData")
        output = deidentify_bytes(deid, ds, "CASE-PSEUDONYM")
        leaked = leaks(output, secrets)
        if leaked:
            problems.append(f"{path.name} leaks {sorted(leaked)[:5]}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = pydicom.dcmread(io.BytesIO(output), force=True)
            list(back.iterall())
        if back.get("PixelData") != pixels:
            problems.append(f"{path.name}: pixel data changed")
        if back.PatientIdentityRemoved != "YES" or any(e.tag.is_private and e.tag.element >= 0x1000
                                                       for e in back.iterall()):
            problems.append(f"{path.name}: not marked, or private data kept")
    assert not problems, "\n".join(problems)
    assert checked > 500  # the scan looked for real identifying values


@pytest.mark.parametrize("option_set", OPTION_SETS)
def test_generated_identifiers_never_reach_an_output_byte(option_set: str,
                                                          pseudonyms: Pseudonymizer) -> None:
    options = OPTION_SETS[option_set]
    deid = Deidentifier(pseudonyms, options)
    ds = patient_instance(7, 3)
    pixels = ds.PixelData
    output = deidentify_bytes(deid, ds, pseudonyms.case_id("patient:MRN-000007"))
    leaked = leaks(output, set(identifying_values(7)) | secrets_of(patient_instance(7, 3),
                                                                    options))
    assert not leaked, f"leaked {leaked}"
    back = pydicom.dcmread(io.BytesIO(output))
    assert back.PixelData == pixels
    assert back.PatientID == back.PatientName == pseudonyms.case_id("patient:MRN-000007")
    assert not any(e.tag.is_private for e in back.iterall())  # no safe list given
    assert 0x60003000 not in back and 0x60000010 not in back  # overlay gone whole
    codes = [i.CodeValue for i in back.DeidentificationMethodCodeSequence]
    assert codes == options.option_codes()
    # Nested identifiers: replaced (pseudonyms, new UIDs), never just left in place.
    assert "OtherPatientIDsSequence" not in back
    reference = back.ReferencedImageSequence[0]
    assert reference.ReferencedSOPClassUID == ds.SOPClassUID
    assert reference.ReferencedSOPInstanceUID == Deidentifier(pseudonyms).uid(
        patient_instance(7, 1).SOPInstanceUID)  # still points at the (remapped) slice 1
    assert back.ContentSequence[0].PersonName == "ANONYMIZED"
    # Free text in a dummy-replaced sequence goes too; its codes stay.
    assert back.ContentSequence[1].TextValue == "ANONYMIZED"
    assert back.ContentSequence[1].ConceptNameCodeSequence[0].CodeMeaning == "Finding"
    assert back.file_meta.MediaStorageSOPInstanceUID == back.SOPInstanceUID
    if option_set == "basic":
        assert back.DeidentificationMethod == DEID_METHOD
        assert back.LongitudinalTemporalInformationModified == "REMOVED"
        assert not back.get("PatientSex") and not back.get("StudyDate")
        assert "StudyDescription" not in back and "RequestAttributesSequence" not in back
    else:
        assert back.LongitudinalTemporalInformationModified == "MODIFIED"
        assert back.PatientSex == "F" and back.PatientAge == "071Y"  # characteristics
        assert back.DeviceSerialNumber == "SN-99117733"  # device identity
        assert back.StudyDescription.startswith("CT chest for")  # cleaned, not dropped
        assert back.StudyDate != "20210314" and len(back.StudyDate) == 8
        # Clean Descriptors keeps the request sequence, its identifiers replaced.
        request = back.RequestAttributesSequence[0]
        assert request.get("RequestedProcedureID") != "RP-000007"
        assert not request.get("ReferencedStudySequence")  # X/Z: emptied


def test_safe_private_keeps_only_listed_attributes(pseudonyms: Pseudonymizer) -> None:
    options = DeidOptions(retain_safe_private=True, safe_private=(
        SafePrivate(creator="ZZACME 1.0", group=0x0009, element=0x02),))
    back = Deidentifier(pseudonyms, options).deidentify(patient_instance(4, 1), "c-x")
    block = back.private_block(0x0009, "ZZACME 1.0")
    assert 0x02 in block and 0x01 not in block
    nested = block[0x02].value[0]
    assert nested.PatientName == "c-x" or "PatientName" not in nested or \
        "Hidden" not in str(nested.PatientName)
    assert "HID-" not in str(nested.get("PatientID", ""))


def test_institution_identity_goes_unless_the_study_retains_it(
        pseudonyms: Pseudonymizer) -> None:
    basic = Deidentifier(pseudonyms).deidentify(patient_instance(5, 1), "c-5")
    # X/Z/D: a keyed pseudonym where the IOD needs a value; the address (X) goes.
    assert "Quintessa" not in str(basic.get("InstitutionName", ""))
    assert "InstitutionAddress" not in basic
    options = DeidOptions(retain_institution_identity=True)
    kept = Deidentifier(pseudonyms, options).deidentify(patient_instance(5, 1), "c-5")
    assert kept.InstitutionName == "Saint Quintessa Infirmary"
    assert kept.InstitutionAddress == "1 Quayside Road, Porthmere"
    assert not kept.get("PatientBirthDate") and kept.PatientID == "c-5"  # the rest as basic
    assert [i.CodeValue for i in kept.DeidentificationMethodCodeSequence] == \
        ["113100", "113112"]
    assert "Retain Institution Identity Option" in Deidentifier(pseudonyms, options).profile


def test_same_patient_links_across_runs_and_patients_never_collide(tmp_path: Path) -> None:
    key = tmp_path / "pseudonym.key"
    first, second = Pseudonymizer.from_key_file(key), Pseudonymizer.from_key_file(key)
    options = DeidOptions(retain_modified_dates=True)
    runs = []
    for pseudonyms, instance in ((first, 1), (second, 2)):  # two runs, two batches
        case_id = pseudonyms.case_id("patient:MRN-000042")
        runs.append(Deidentifier(pseudonyms, options).deidentify(
            patient_instance(42, instance), case_id))
    a, b = runs
    assert a.PatientID == b.PatientID
    assert a.StudyInstanceUID == b.StudyInstanceUID != patient_instance(42, 1).StudyInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
    assert a.StudyDate == b.StudyDate != "20210314"
    # One shift for every date of the patient: intervals and times survive.
    assert a.AcquisitionDateTime == b.AcquisitionDateTime == a.StudyDate + "101733.123"
    assert not a.get("PatientBirthDate")  # no option retains it
    other = Deidentifier(first, options).deidentify(patient_instance(43, 1),
                                                    first.case_id("patient:MRN-000043"))
    assert other.PatientID != a.PatientID
    ids = {first.case_id(f"patient:MRN-{n:06d}") for n in range(5000)}
    assert len(ids) == 5000
    assert Pseudonymizer(b"k" * 32).case_id("patient:MRN-000042") != a.PatientID


def test_option_table_agrees_with_the_basic_profile_source() -> None:
    """The two machine-readable sources (dicom-anonymizer's Basic Profile, the extracted
    option columns with their own Basic column) are independent scrapes of one standard:
    they must agree on nearly every attribute, or an extraction went wrong."""
    import json
    from importlib import resources

    extracted = json.loads(resources.files("tributary.spoke.deid").joinpath(
        "ps315_options.json").read_text())["columns"]
    basic = action_table(DeidOptions()).single
    theirs = {int(k, 16): v for k, v in extracted["113100"]["rules"].items()
              if "x" not in k and k != "private"}
    common = set(basic) & set(theirs)
    assert len(common) > 550
    agree = sum(basic[t] == theirs[t] for t in common)
    assert agree / len(common) > 0.95
    dates = action_table(DeidOptions(retain_modified_dates=True)).single
    assert dates[0x00080020] == "C" and dates[0x00080022] == "C"  # Study, Acquisition Date
    assert action_table(DeidOptions(retain_patient_characteristics=True)).single[
        0x00101010] == "K"  # Patient's Age


def test_the_option_codes_are_pydicom_s() -> None:
    """The CID 7050 codes the engine records are those of pydicom's code dictionary."""
    from pydicom.sr.codedict import codes

    from tributary.spoke.deid.profile import CODE_NAMES, CODES, option_code

    assert set(CODES) == set(CODE_NAMES)
    for code, name in CODE_NAMES.items():
        concept = getattr(codes.DCM, name)
        expected = (concept.value, concept.scheme_designator, concept.meaning)
        assert tuple(option_code(code)) == expected
