"""What an algorithm sees of a case: a participant JSON that validates against the
documented schema and de-identified DICOM from the spoke's store, neither holding any
direct identifier of the source files, and mounts that point only into the store."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pydicom
import pytest

from tributary.protocol.messages import CohortSelection
from tributary.spoke.config import SpokeConfig
from tributary.spoke.deid import DEID_METHOD
from tributary.spoke.ingest import ingest, open_catalog, series_folders, store_root
from tributary.spoke.participant import build_participant
from tributary.spoke.pseudonyms import Pseudonymizer
from tributary.testbed.federation import generate_cohort

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "schemas" /
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


def leaks(secrets: set[str], path: Path) -> list[str]:
    """Identifiers found in a file: anywhere in its text, or, for short ones (a 4-digit
    study ID could occur by chance inside a new random UID), as a whole value."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    text = all_strings(path)
    values = {str(e.value) for e in ds.iterall()} | {str(e.value) for e in ds.file_meta}
    return [s for s in secrets if (s in text if len(s) >= 8 else s in values)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("deid")
    generate_cohort(root / "data", 3, seed=11, site="Saint Identifiable Hospital")
    config = SpokeConfig(spoke_id="site-a", data_dir=root / "data", work_dir=root / "work",
                         hub_public_key=root / "hub.pub")
    ingest(config)
    catalog = open_catalog(config)
    out = []
    for case in catalog.select(CohortSelection()):
        deid = series_folders(config, [s.series_id for s in case.series])
        participant, mounts = build_participant(case, "exp-1", deid)
        out.append((case, deid, participant, mounts))
    catalog.close()
    sources = sorted((root / "data").rglob("*.dcm"))
    secrets = {v for f in sources for v in identifiers(f)}
    secrets |= {p.name for p in (root / "data").iterdir() if p.is_dir()}
    return {"root": root, "config": config, "cases": out, "secrets": secrets}


def test_participant_validates_and_holds_no_identifier(prepared: dict) -> None:
    assert len(prepared["cases"]) == 3
    store = store_root(prepared["config"].work_dir).resolve()
    for _case, _deid, participant, mounts in prepared["cases"]:
        document = json.loads(participant.model_dump_json())
        jsonschema.validate(document, SCHEMA)
        text = json.dumps(document)
        assert prepared["secrets"], "the synthetic source should carry identifiers"
        leaked = [s for s in prepared["secrets"] if s in text]
        assert not leaked, f"participant JSON leaks {leaked}"
        assert document["case_id"].startswith("c-")
        assert [s["instance_count"] for s in document["series"]] == [40]
        for folder in mounts.values():
            assert folder.resolve().is_relative_to(store), f"{folder} is outside the store"
            assert len(list(folder.iterdir())) == 40


def test_deidentified_dicom_holds_no_identifier(prepared: dict) -> None:
    for case, deid, _participant, _mounts in prepared["cases"]:
        for series_dir in deid.values():
            files = sorted(series_dir.glob("*.dcm"))
            assert files
            for path in files:
                leaked = leaks(prepared["secrets"], path)
                assert not leaked, f"{path.name} leaks {leaked}"
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                assert ds.PatientIdentityRemoved == "YES"
                assert ds.DeidentificationMethod == DEID_METHOD
                assert ds.PatientID == case.case_id
                assert not any(e.tag.is_private for e in ds.iterall())


def test_pseudonyms_are_stable_and_keyed(prepared: dict) -> None:
    config = prepared["config"]
    report = ingest(config)
    assert report.stored == 0 and report.unchanged > 0
    catalog = open_catalog(config)
    assert [c.case_id for c in catalog.select(CohortSelection())] == [
        c.case_id for c, *_ in prepared["cases"]]
    catalog.close()
    pseudonyms = Pseudonymizer.from_key_file(config.work_dir / "pseudonym.key")
    other = Pseudonymizer(b"k" * 32)
    assert other.case_id("patient:1") != pseudonyms.case_id("patient:1")
