"""The spoke's de-identified store and catalog: ingest from a folder in any layout is
incremental (a second run is a no-op, new files are picked up), exclusions carry reasons,
cohorts are selected by criteria (and by no attribute the site does not release), and the
data steward's commands show the same."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from deid_samples import patient_instance, screen_capture, write
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.protocol.auditlog import read_entries
from tributary.protocol.messages import CohortSelection, ExperimentMessage
from tributary.spoke import ingest as ingest_module
from tributary.spoke.catalog import SelectionRefused
from tributary.spoke.config import SpokeConfig
from tributary.spoke.ingest import ingest, open_catalog, store_root
from tributary.spoke.journal import claim_work_dir
from tributary.testbed.federation import generate_cohort


def cohort(root: Path, name: str, cases: int, seed: int, slices: int) -> dict:
    """A small synthetic cohort (64x64 pixels) and its attribute rows."""
    out = root / name
    generate_cohort(out, cases, seed=seed, site=f"{name} General", size=64, slices=slices)
    with open(out / "attributes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {"dir": out, "rows": rows,
            "files": sorted(p for p in out.rglob("*.dcm"))}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("cohorts")
    return {"a": cohort(root, "a", 3, seed=21, slices=16),
            "b": cohort(root, "b", 2, seed=22, slices=20)}


def write_attributes(path: Path, *groups: dict) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["patient_id", "nodule_count", "nodules"])
        writer.writeheader()
        for group in groups:
            writer.writerows(group["rows"])


def config_for(root: Path, data: Path, workers: int = 1) -> SpokeConfig:
    return SpokeConfig(spoke_id="site-a", data_dir=data, work_dir=root / "work",
                       hub_public_key=root / "hub.pub", catalog={"workers": workers},
                       policy={"releasable_attributes": ["nodule_count"],
                               "attributes_file": "attributes.csv"})


def store_state(config: SpokeConfig) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in store_root(config.work_dir).rglob("*")
            if p.is_file()}


def test_reingest_is_a_no_op_and_new_files_are_picked_up(cohorts: dict, tmp_path: Path
                                                         ) -> None:
    a, b = cohorts["a"], cohorts["b"]
    data = tmp_path / "data"
    shutil.copytree(a["dir"], data / "archive" / "2024")  # nested: any layout goes
    (data / "archive" / "2024" / "attributes.csv").unlink()
    write_attributes(data / "attributes.csv", a, b)  # b's rows wait for b's images
    config = config_for(tmp_path, data)

    first = ingest(config)
    assert first.stored == len(a["files"]) == 48
    assert first.excluded == 1  # ground_truth.json; the attributes file is not an input
    assert (first.attributes_cases, first.attributes_unmatched) == (3, 2)
    catalog = open_catalog(config)
    before, files_before = catalog.snapshot(), store_state(config)
    assert catalog.counts()["cases"] == 3

    second = ingest(config, catalog)
    assert (second.stored, second.excluded, second.duplicates) == (0, 0, 0)
    assert second.unchanged == first.stored + first.excluded
    assert catalog.snapshot() == before
    assert store_state(config) == files_before, "re-ingest must not rewrite the store"

    touched = next((data / "archive").rglob("*.dcm"))
    os.utime(touched, ns=(1, 1))  # same content, new fingerprint: read again, no change
    third = ingest(config, catalog)
    assert (third.stored, third.duplicates, third.excluded) == (0, 0, 0)
    assert catalog.snapshot() == before and store_state(config) == files_before

    flat = data / "incoming"  # new case, all files in one folder, other names
    flat.mkdir()
    for index, path in enumerate(b["files"][:20]):
        shutil.copy(path, flat / f"img{index}")
    shutil.copy(a["files"][0], data / "copy-of-a-slice.dcm")
    (data / "notes.txt").write_text("not an image")
    (data / "cut.dcm").write_bytes(a["files"][1].read_bytes()[:3000])
    fourth = ingest(config, catalog)
    assert fourth.stored == 20 and fourth.duplicates == 1 and fourth.excluded == 2
    assert fourth.unchanged == second.unchanged
    counts = catalog.counts()
    assert counts["cases"] == 4 and counts["instances"] == 68
    assert fourth.attributes_cases == 4
    reasons = {e.ref: (e.status, e.reason) for e in catalog.exclusions()}
    assert reasons["notes.txt"][0] == "excluded"
    assert reasons["notes.txt"][1].startswith("not-dicom: "), reasons["notes.txt"]
    assert reasons["copy-of-a-slice.dcm"][0] == "duplicate"
    assert reasons["cut.dcm"][0] == "excluded"
    assert reasons["cut.dcm"][1].startswith("truncated: "), reasons["cut.dcm"]
    assert reasons["archive/2024/ground_truth.json"][0] == "excluded"
    old = {row for row in before["instances"]}
    assert old <= set(catalog.snapshot()["instances"]), "stored instances never change"
    catalog.close()


@pytest.fixture(scope="module")
def catalogued(cohorts: dict, tmp_path_factory: pytest.TempPathFactory) -> SpokeConfig:
    root = tmp_path_factory.mktemp("catalogued")
    data = root / "data"
    for name in ("a", "b"):
        shutil.copytree(cohorts[name]["dir"], data / name)
        (data / name / "attributes.csv").unlink()
    write_attributes(data / "attributes.csv", cohorts["a"], cohorts["b"])
    config = config_for(root, data, workers=2)
    threshold, ingest_module._PARALLEL_MIN = ingest_module._PARALLEL_MIN, 8
    try:  # 88 new files: worker processes
        assert ingest(config).stored == 88
    finally:
        ingest_module._PARALLEL_MIN = threshold
    return config


def test_selection_by_criteria(catalogued: SpokeConfig, cohorts: dict) -> None:
    catalog = open_catalog(catalogued)
    everyone = catalog.select(CohortSelection())
    assert len(everyone) == 5
    assert [c.case_id for c in everyone] == sorted(c.case_id for c in everyone)

    def ids(**criteria: object) -> list[str]:
        selection = CohortSelection(**criteria)
        chosen = catalog.select(selection)
        assert catalog.count(selection) == len(chosen)
        return [c.case_id for c in chosen]

    assert ids(modality="MR") == []
    assert len(ids(modality=None, body_part="chest")) == 5
    assert ids(body_part="HEAD") == []
    thick = ids(min_slices=18)
    thin = ids(max_slices=16)
    assert len(thick) == 2 and len(thin) == 3 and not set(thick) & set(thin)
    assert ids(min_slices=16, max_slices=20) == [c.case_id for c in everyone]
    by_count: dict[int, int] = {}
    for group in cohorts.values():
        for row in group["rows"]:
            by_count[int(row["nodule_count"])] = by_count.get(int(row["nodule_count"]), 0) + 1
    for nodules, expected in by_count.items():
        chosen = catalog.select(CohortSelection(attributes={"nodule_count": nodules}))
        assert len(chosen) == expected
        assert all(c.attributes["nodule_count"] == nodules for c in chosen)
    assert ids(attributes={"nodule_count": "1"}) == []  # typed: 1 is not "1"
    assert ids(case_ids=[everyone[3].case_id, "c-0000000000000000"]) == [everyone[3].case_id]
    assert ids(max_cases=2) == [c.case_id for c in everyone[:2]]
    with pytest.raises(SelectionRefused, match="nodules"):
        catalog.select(CohortSelection(attributes={"nodules": "[]"}))
    with pytest.raises(ValueError):
        CohortSelection(min_slices=30, max_slices=10)
    catalog.close()


def test_old_experiment_messages_still_validate() -> None:
    """Messages from hubs that predate the catalog criteria decode unchanged."""
    message = ExperimentMessage.model_validate({
        "experiment_id": "e1", "spoke_id": "site-a",
        "algorithm": {"name": "x", "version": "1", "repository": "registry:5000/x",
                      "digest": "sha256:" + "0" * 64},
        "cohort": {"modality": "CT", "max_cases": 3}})
    assert message.cohort.attributes == {} and message.cohort.min_slices is None
    with pytest.raises(ValueError):
        CohortSelection.model_validate({"modality": "CT", "unknown": 1})


def test_steward_commands(catalogued: SpokeConfig, tmp_path: Path) -> None:
    config = tmp_path / "spoke.toml"
    config.write_text(
        f'spoke_id = "site-a"\ndata_dir = "{catalogued.data_dir}"\n'
        f'work_dir = "{catalogued.work_dir}"\nhub_public_key = "hub.pub"\n'
        '[policy]\nreleasable_attributes = ["nodule_count"]\n'
        'attributes_file = "attributes.csv"\n')
    runner = CliRunner()
    result = runner.invoke(app, ["spoke", "ingest", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "data" in result.output and "attributes: 5 cases matched" in result.output
    [entry] = [e for _, e in read_entries(catalogued.work_dir / "audit.jsonl")
               if e and e["action"] == "catalog.ingested"]
    assert entry["detail"]["stored"] == 0 and entry["actor"].startswith("cli:")
    result = runner.invoke(app, ["spoke", "catalog", "-c", str(config), "--json",
                                 "--min-slices", "18"])
    assert result.exit_code == 0, result.output
    cases = json.loads(result.output)
    assert len(cases) == 2 and all(s["instance_count"] == 20 for c in cases
                                   for s in c["series"])
    result = runner.invoke(app, ["spoke", "exclusions", "-c", str(config), "--json"])
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert {r["ref"] for r in rows} == {"a/ground_truth.json", "b/ground_truth.json"}
    assert all(r["reason"].startswith("not-dicom: ") for r in rows)


def test_sources_from_the_config_file(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                      ) -> None:
    config = tmp_path / "spoke.toml"
    config.write_text(
        'spoke_id = "site-a"\nwork_dir = "work"\nhub_public_key = "hub.pub"\n'
        '[policy]\nattributes_file = "labels.csv"\n'
        '[[sources]]\nkind = "folder"\nname = "archive"\npath = "images"\n'
        '[[sources]]\nkind = "dicomweb"\nname = "pacs"\n'
        'url = "https://pacs.example/dicom-web"\nusername = "reader"\n'
        'password = "s3cret-pacs"\n')
    config.chmod(0o644)
    loaded = SpokeConfig.load(config)
    assert [s.name for s in loaded.all_sources] == ["archive", "pacs"]
    assert loaded.sources[0].path == tmp_path / "images"
    assert loaded.attributes_path == tmp_path / "labels.csv"
    assert "s3cret-pacs" not in repr(loaded) and "s3cret-pacs" not in caplog.text
    assert "readable by other users" in caplog.text
    with pytest.raises(ValueError, match="data_dir or at least one"):
        SpokeConfig(spoke_id="site-a", work_dir=tmp_path, hub_public_key=tmp_path / "k")


def test_screening_keeps_unsafe_inputs_out_of_the_store(tmp_path: Path) -> None:
    """Screen captures and burned-in annotation are excluded; derived images are stored
    with a review note; an image already stored under another header is excluded even
    when it arrives in a later ingest."""
    data = tmp_path / "data"
    for instance in (1, 2, 3):
        write(patient_instance(7, instance, position=float(instance)),
              data / f"ct/{instance}.dcm")
    write(screen_capture(7), data / "capture.dcm")
    burned = patient_instance(7, 4, position=4.0)
    burned.BurnedInAnnotation = "YES"
    write(burned, data / "burned.dcm")
    write(patient_instance(7, 1, series=2, image_type=("DERIVED", "PRIMARY", "MPR")),
          data / "derived.dcm")
    config = SpokeConfig(spoke_id="site-a", data_dir=data, work_dir=tmp_path / "work",
                         hub_public_key=tmp_path / "hub.pub", catalog={"workers": 1})
    first = ingest(config)
    assert (first.stored, first.excluded) == (4, 2)

    original = patient_instance(7, 1, position=1.0)
    copy = patient_instance(7, 9, position=1.0, pixels=np.frombuffer(
        original.PixelData, dtype=np.uint16).reshape(original.Rows, original.Columns))
    write(copy, data / "re-exported.dcm")  # same image, new SOP Instance UID
    second = ingest(config)
    assert (second.stored, second.excluded) == (0, 1)

    with open_catalog(config) as catalog:
        rows = {e.ref: (e.status, e.reason) for e in catalog.exclusions()}
        assert catalog.counts()["instances"] == 4
    assert rows["capture.dcm"][0] == "excluded" and "screen-capture" in rows["capture.dcm"][1]
    assert rows["burned.dcm"][0] == "excluded"
    assert "burned-in-annotation" in rows["burned.dcm"][1]
    assert rows["derived.dcm"][0] == "stored" and "derived-image" in rows["derived.dcm"][1]
    assert rows["re-exported.dcm"] == ("excluded", "duplicate-pixels: same pixel data as a "
                                                   "stored instance under another header")
    stored = list(store_root(config.work_dir).rglob("*.dcm"))
    assert len(stored) == 8  # 4 objects + 4 series links


def test_deidentification_options_reach_the_store_and_a_change_needs_a_rebuild(
        cohorts: dict, tmp_path: Path) -> None:
    """[deidentification] decides what the store holds and the profile it records (which
    custody records state); new options never mix with files made under the old ones."""
    import pydicom

    from tributary.spoke.catalog import ProfileChanged
    from tributary.spoke.deid import DeidOptions, profile_name

    data = tmp_path / "data"
    shutil.copytree(cohorts["b"]["dir"], data)
    config = tmp_path / "spoke.toml"
    base = (f'spoke_id = "site-a"\ndata_dir = "{data}"\nwork_dir = "work"\n'
            'hub_public_key = "hub.pub"\n')
    config.write_text(base + "[deidentification]\nretain_patient_characteristics = true\n")
    kept = SpokeConfig.load(config)
    assert kept.deidentification == DeidOptions(retain_patient_characteristics=True)
    assert ingest(kept).stored == len(cohorts["b"]["files"])
    with open_catalog(kept) as catalog:
        assert catalog.deid_profile() == profile_name(kept.deidentification)
        assert "Retain Patient Characteristics" in catalog.deid_profile()
    stored = sorted((store_root(kept.work_dir) / "objects").rglob("*.dcm"))
    assert pydicom.dcmread(stored[0]).PatientSex in ("F", "M")

    config.write_text(base)  # back to the Basic Profile: the store must be rebuilt first
    basic = SpokeConfig.load(config)
    with pytest.raises(ProfileChanged, match="--rebuild"):
        ingest(basic)
    with open_catalog(basic) as catalog:  # nothing was mixed in
        assert catalog.deid_profile() == profile_name(kept.deidentification)
    # While an agent holds the work folder (its running cases mount the store), a rebuild
    # is refused and the store stays as it was.
    agent_lock = claim_work_dir(basic.work_dir)
    try:
        busy = CliRunner().invoke(app, ["spoke", "ingest", "-c", str(config), "--rebuild"])
    finally:
        os.close(agent_lock)
    assert busy.exit_code == 1 and "another spoke process" in busy.output
    assert sorted((store_root(kept.work_dir) / "objects").rglob("*.dcm")) == stored
    result = CliRunner().invoke(app, ["spoke", "ingest", "-c", str(config), "--rebuild"])
    assert result.exit_code == 0, result.output
    with open_catalog(basic) as catalog:
        assert catalog.deid_profile() == profile_name(DeidOptions())
        assert catalog.counts()["instances"] == len(cohorts["b"]["files"])
    for path in (store_root(basic.work_dir) / "objects").rglob("*.dcm"):
        assert "PatientSex" not in pydicom.dcmread(path) or not pydicom.dcmread(
            path).PatientSex
    actions = [e["action"] for _, e in read_entries(basic.work_dir / "audit.jsonl") if e]
    assert actions[-2:] == ["catalog.rebuilt", "catalog.ingested"]


def test_inputs_sharing_a_uid_are_counted_as_the_store_holds_them(tmp_path: Path) -> None:
    """pydicom's own test files share SOP Instance UIDs: the ingest report's counts add up
    to the inputs seen, every input has one catalog row, and the store holds exactly the
    catalog's instances, each under its digest and in its series folder."""
    from pydicom.data import get_testdata_files

    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(get_testdata_files("*.dcm")):
        shutil.copy(name, data / f"{i:03d}-{Path(name).name}")
    seen = len(list(data.iterdir()))
    write_attributes(data / "attributes.csv")  # the config names one; it is no input
    config = config_for(tmp_path, data)  # OCR is beside the point here, and slow
    config.deidentification = config.deidentification.model_copy(
        update={"text_detection": "off"})
    report = ingest(config)
    assert report.stored + report.duplicates + report.excluded + report.unchanged == seen
    objects = sorted(p.stem for p in (store_root(config.work_dir) / "objects").rglob("*.dcm"))
    with open_catalog(config) as catalog:
        left_out = [e for e in catalog.exclusions() if e.status != "stored"]
        inputs = sum(len(catalog.known_refs(s)) for s in {e.source for e in left_out})
        instances = catalog.snapshot()["instances"]  # (uid, series, digest, number, pixels)
        counts = catalog.counts()
        in_series = {s.series_id: catalog.instance_digests(s.series_id)
                     for case in catalog.cases() for s in case.series}
    digests = sorted(row[2] for row in instances)
    assert inputs == seen and len(left_out) == report.duplicates + report.excluded
    assert counts["instances"] == report.stored == len(digests)
    assert objects == digests
    for series_id, series_digests in in_series.items():
        folder = store_root(config.work_dir) / "series" / series_id
        assert sorted(p.stem for p in folder.iterdir()) == sorted(series_digests)
    assert any("SOP Instance UID" in e.reason for e in left_out)  # collisions, named
    # The same again: nothing changes, nothing is counted twice.
    again = ingest(config)
    assert again.unchanged == seen and again.stored == again.excluded == 0
