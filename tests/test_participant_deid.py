"""What an algorithm sees of a case: a participant JSON that validates against the
documented schema and de-identified DICOM, neither holding any direct identifier of the
source files."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pydicom
import pytest

from tributary.federation import generate_cohort
from tributary.spoke import cohort
from tributary.spoke.deid import DEID_METHOD, deidentified_case
from tributary.spoke.participant import build_participant
from tributary.spoke.pseudonyms import Pseudonymizer

SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" / "schemas" /
                     "participant.schema.json").read_text())
IDENTIFYING = ["PatientName", "PatientID", "PatientBirthDate", "PatientAddress",
               "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
               "OperatorsName", "AccessionNumber", "StudyID", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID"]


def identifiers(path: Path) -> set[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values = {str(ds.get(k, "")) for k in IDENTIFYING} - {""}
    values |= {str(e.value) for e in ds.iterall() if e.tag.is_private and isinstance(e.value, str)}
    return {v for v in values if len(v) >= 4}


def all_strings(path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return "\n".join(str(e.value) for e in ds.iterall()) + "\n".join(
        str(e.value) for e in ds.file_meta)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("deid")
    generate_cohort(root / "data", 3, seed=11, site="Saint Identifiable Hospital")
    pseudonyms = Pseudonymizer.from_key_file(root / "work" / "key")
    cases = cohort.discover(root / "data", pseudonyms)
    out = []
    for case in cases:
        deid = deidentified_case(case, root / "work", pseudonyms)
        participant, mounts = build_participant(case, "exp-1", deid)
        out.append((case, deid, participant, mounts))
    return {"root": root, "cases": out, "pseudonyms": pseudonyms}


def test_participant_validates_and_holds_no_identifier(prepared: dict) -> None:
    for case, _deid, participant, _mounts in prepared["cases"]:
        document = json.loads(participant.model_dump_json())
        jsonschema.validate(document, SCHEMA)
        text = json.dumps(document)
        secrets = {case.folder.name} | {v for s in case.series for f in s.files
                                        for v in identifiers(f)}
        assert secrets, "the synthetic source should carry identifiers"
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"participant JSON leaks {leaked}"
        assert document["case_id"].startswith("c-")


def test_deidentified_dicom_holds_no_identifier(prepared: dict) -> None:
    for case, deid, _participant, _mounts in prepared["cases"]:
        secrets = {v for s in case.series for f in s.files for v in identifiers(f)}
        for series_dir in deid.values():
            files = sorted(series_dir.glob("*.dcm"))
            assert files
            for path in files:
                text = all_strings(path)
                leaked = [s for s in secrets if s in text]
                assert not leaked, f"{path.name} leaks {leaked}"
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                assert ds.PatientIdentityRemoved == "YES"
                assert ds.DeidentificationMethod == DEID_METHOD
                assert ds.PatientID == case.case_id
                assert not any(e.tag.is_private for e in ds.iterall())


def test_pseudonyms_are_stable_and_deid_runs_once(prepared: dict) -> None:
    root, pseudonyms = prepared["root"], prepared["pseudonyms"]
    again = cohort.discover(root / "data", Pseudonymizer.from_key_file(root / "work" / "key"))
    assert [c.case_id for c in again] == [c.case_id for c, *_ in prepared["cases"]]
    case, deid, *_ = prepared["cases"][0]
    stamp = {p: p.stat().st_mtime_ns for d in deid.values() for p in d.iterdir()}
    deidentified_case(case, root / "work", pseudonyms)
    assert stamp == {p: p.stat().st_mtime_ns for d in deid.values() for p in d.iterdir()}
    other = Pseudonymizer(b"k" * 32)
    assert other.case_id("patient:1") != pseudonyms.case_id("patient:1")


def test_unreadable_files_are_reported(prepared: dict, tmp_path: Path) -> None:
    data = tmp_path / "data" / "case-broken"
    data.mkdir(parents=True)
    (data / "junk.dcm").write_bytes(b"this is not dicom")
    good = next(iter(prepared["cases"]))[0].series[0].files[0]
    (data / "good.dcm").write_bytes(good.read_bytes())
    [case] = cohort.discover(tmp_path / "data", prepared["pseudonyms"])
    assert [p.name for p, _ in case.unreadable] == ["junk.dcm"]
    assert len(case.series) == 1
