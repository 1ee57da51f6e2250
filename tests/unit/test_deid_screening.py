"""Screening before de-identification: damaged, foreign, risky and duplicate files are
excluded with their reason, review cases are flagged, incomplete series are reported; and
the data steward's `tributary spoke deidentify` puts it all in its JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from deid_samples import identifying_values, patient_instance, screen_capture, write
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.spoke.deid import DeidOptions, Reason, Screener, screen_files
from tributary.spoke.pseudonyms import Pseudonymizer


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "src" / "Oxbridge1 Jonathan1"  # folder names carry identities too
    for n in (1, 2, 3, 5, 6):  # instance 4 and its slice are missing
        write(patient_instance(1, n), src / f"slice{n}.dcm")
    whole = (src / "slice6.dcm").read_bytes()
    (src / "truncated.dcm").write_bytes(whole[: len(whole) - 100])
    (src / "notes.txt").write_text("Jonathan1 Oxbridge1, MRN-000001: discharged")
    write(screen_capture(1), src / "screen.dcm")
    burned = patient_instance(1, 1, series=3)
    burned.BurnedInAnnotation = "YES"
    write(burned, src / "burned.dcm")
    # The same pixels as slice 2 under another header: a re-export, not a new image.
    again = patient_instance(1, 2, series=4, pixels=np.frombuffer(
        patient_instance(1, 2).PixelData, dtype=np.uint16).reshape(16, 16))
    again.SeriesDescription = "re-export"
    write(again, src / "x-copy-of-2.dcm")
    derived = patient_instance(1, 1, series=5, image_type=("DERIVED", "PRIMARY", "MPR"))
    write(derived, src / "mpr.dcm")
    return tmp_path / "src"


def reasons(report, name: str) -> list[Reason]:  # type: ignore[no-untyped-def]
    [verdict] = [f for f in report.files if Path(f.path).name == name]
    return [f.reason for f in verdict.findings]


def test_exclusions_and_flags_carry_their_reasons(folder: Path) -> None:
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    report = screen_files(paths, DeidOptions(), Pseudonymizer(b"s" * 32))
    assert reasons(report, "truncated.dcm") == [Reason.TRUNCATED]
    assert reasons(report, "notes.txt") == [Reason.NOT_DICOM]
    assert Reason.SCREEN_CAPTURE in reasons(report, "screen.dcm")
    assert reasons(report, "burned.dcm") == [Reason.BURNED_IN_ANNOTATION]
    assert reasons(report, "x-copy-of-2.dcm") == [Reason.DUPLICATE_PIXELS]
    assert "slice2.dcm" in report.files[[Path(f.path).name for f in report.files].index(
        "x-copy-of-2.dcm")].findings[0].detail
    assert reasons(report, "mpr.dcm") == [Reason.DERIVED_IMAGE]
    assert {Path(f.path).name for f in report.excluded()} == {
        "truncated.dcm", "notes.txt", "screen.dcm", "burned.dcm", "x-copy-of-2.dcm"}
    assert {Path(f.path).name for f in report.flagged()} == {"mpr.dcm"}
    assert all(reasons(report, f"slice{n}.dcm") == [] for n in (1, 2, 3, 5, 6))
    # Nothing silently dropped: every file has a verdict.
    assert len(report.files) == len(paths)
    [main] = [s for s in report.series if s.files == 5]
    assert not main.complete and main.missing_instance_numbers == [4]
    assert len(main.slice_gaps) == 1 and main.slice_gaps[0].startswith("3.00 -> 5.00")
    allowed = screen_files(paths, DeidOptions(allow_burned_in=True))
    assert reasons(allowed, "burned.dcm") == []
    in_memory = Screener().check_dataset(screen_capture(2), "received instance")
    assert in_memory.excluded and in_memory.findings[0].reason == Reason.SCREEN_CAPTURE


def test_deidentify_command_writes_outputs_and_report(folder: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    key = tmp_path / "steward.key"
    result = CliRunner().invoke(app, ["spoke", "deidentify", str(folder), str(dst),
                                      "--key", str(key), "--retain-modified-dates"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out-report.json").read_text())
    assert report["files_seen"] == 11 and report["files_written"] == 6
    assert report["excluded"] == 5 and report["flagged"] == 1
    assert report["reasons"] == {"truncated": 1, "not-dicom": 1, "screen-capture": 1,
                                 "burned-in-annotation": 1, "duplicate-pixels": 1,
                                 "derived-image": 2, "secondary-capture": 1}
    assert "Modified Dates" in report["profile"]
    outputs = sorted(p for p in dst.rglob("*") if p.is_file())
    assert len(outputs) == 6
    case_id = Pseudonymizer.from_key_file(key).case_id("patient:MRN-000001")
    for path in outputs:
        assert path.relative_to(dst).parts[0] == case_id
        data = path.read_bytes()
        leaked = [v for v in identifying_values(1) if v.encode() in data]
        assert not leaked, f"{path.name} leaks {leaked}"
        assert "Oxbridge1" not in str(path)
        ds = pydicom.dcmread(path)
        assert ds.PatientID == case_id and ds.LongitudinalTemporalInformationModified == \
            "MODIFIED"
    # A second run (another batch, same key) gives the same pseudonyms and UIDs.
    again = tmp_path / "again"
    assert CliRunner().invoke(app, ["spoke", "deidentify", str(folder), str(again), "--key",
                                    str(key), "--retain-modified-dates"]).exit_code == 0
    assert sorted(p.relative_to(again) for p in again.rglob("*.dcm")) == \
        sorted(p.relative_to(dst) for p in outputs)
    first = pydicom.dcmread(outputs[0])
    second = pydicom.dcmread(again / outputs[0].relative_to(dst))
    assert (first.StudyDate, first.StudyInstanceUID) == (second.StudyDate,
                                                         second.StudyInstanceUID)
    log = (tmp_path / "audit.jsonl").read_text().splitlines()
    [entry, _second] = [json.loads(line) for line in log]
    assert entry["action"] == "deid.folder" and entry["detail"]["files_written"] == 6
    assert "Oxbridge1" not in json.dumps(entry)
    # Bad flags are refused with a clear message and nothing is written.
    refused = CliRunner().invoke(app, ["spoke", "deidentify", str(folder), str(tmp_path / "x"),
                                       "--key", str(key), "--safe-private", "nonsense"])
    assert refused.exit_code != 0 and not (tmp_path / "x").exists()


def test_deidentify_command_takes_the_spokes_options_and_flags_override_them(
        folder: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    config = tmp_path / "spoke.toml"
    config.write_text(f'spoke_id = "site-a"\ndata_dir = "{folder}"\nwork_dir = "{work}"\n'
                      f'hub_public_key = "{tmp_path / "hub.pem"}"\n\n[deidentification]\n'
                      "retain_modified_dates = true\nallow_burned_in = true\n")

    def run(name: str, *flags: str) -> dict:
        result = CliRunner().invoke(app, ["spoke", "deidentify", str(folder),
                                          str(tmp_path / name), "--config", str(config),
                                          *flags])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / f"{name}-report.json").read_text())

    spoke = run("as-the-spoke")
    assert spoke["options"]["retain_modified_dates"] and spoke["options"]["allow_burned_in"]
    assert "Modified Dates" in spoke["profile"]
    assert "burned-in-annotation" not in spoke["reasons"] and spoke["files_written"] == 7
    # The spoke's own pseudonym key is used: the case is the spoke's pseudonym for it.
    case_id = Pseudonymizer.from_key_file(work / "pseudonym.key").case_id("patient:MRN-000001")
    assert {p.name for p in (tmp_path / "as-the-spoke").iterdir()} == {case_id}
    overridden = run("overridden", "--no-retain-modified-dates", "--clean-descriptors")
    assert overridden["options"]["retain_modified_dates"] is False
    assert overridden["options"]["clean_descriptors"] is True
    assert overridden["options"]["allow_burned_in"] is True  # not overridden: kept
    assert "Modified Dates" not in overridden["profile"]
