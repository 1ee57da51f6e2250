"""Issue 10, de-identification: sequences hidden behind VR UN, attributes no dictionary
knows, and inputs that share a SOP Instance UID. Each test builds the hostile input from
bytes and scans every output byte (or counts what is really on disk)."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.spoke.deid import Deidentifier
from tributary.spoke.pseudonyms import Pseudonymizer

SECRETS = ("Grimsdottir^Hallveig", "MRN-4471123", "Hospital of Saint Ebbe", "Quillfeather^Ada",
           "1.2.3.4.424242.1")
REFERENCED_SERIES, RADIOPHARMACEUTICAL = 0x00081115, 0x00540016


def implicit_items(items: list[Dataset], undefined: bool) -> bytes:
    """The value of a sequence encoded as PS3.5 6.2.2 asks for a UN sequence: Implicit VR
    Little Endian items (the sequence's own header and delimiter left out)."""
    holder = Dataset()
    seq = Sequence(items)
    seq.is_undefined_length = undefined
    for item in items:
        item.is_undefined_length_sequence_item = undefined
    holder[0x00081115] = DataElement(0x00081115, "SQ", seq)
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = True, True
    write_dataset(fp, holder)
    data = fp.getvalue()[8:]
    return data[:-8] if undefined else data


def un_element(tag: int, items: list[Dataset], undefined: bool) -> RawDataElement:
    """Raw, as a reader meets it (pydicom would decode a DataElement built with UN)."""
    value = implicit_items(items, undefined)
    return raw_un(tag, value, 0xFFFFFFFF if undefined else len(value))


def raw_un(tag: int, value: bytes, length: int | None = None) -> RawDataElement:
    return RawDataElement(BaseTag(tag), "UN", len(value) if length is None else length,
                          value, 0, False, True)


def identifying_item(depth: int) -> Dataset:
    item = Dataset()
    item.PatientName = SECRETS[0]
    item.PatientID = SECRETS[1]
    item.InstitutionName = SECRETS[2]
    item.ReferringPhysicianName = SECRETS[3]
    item.SeriesInstanceUID = SECRETS[4]
    if depth > 1:
        inner = Dataset()
        inner.PatientName = SECRETS[0]
        inner.InstitutionName = SECRETS[2]
        item.RadiopharmaceuticalInformationSequence = [inner]
    return item


def instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.3.4.424242.9"
    ds.StudyInstanceUID = "1.2.3.4.424242.7"
    ds.SeriesInstanceUID = "1.2.3.4.424242.8"
    ds.PatientName = "Someone^Else"
    ds.PatientID = "ID-1"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 7, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes([1, 2, 3, 4])
    return ds


def file_bytes(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def deidentified(data: bytes, pseudonyms: Pseudonymizer) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        Deidentifier(pseudonyms).deidentify(ds, "CASE")
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def leaked(output: bytes) -> list[str]:
    return [s for s in SECRETS if s.encode() in output]


@pytest.fixture(scope="module")
def pseudonyms(tmp_path_factory: pytest.TempPathFactory) -> Pseudonymizer:
    return Pseudonymizer.from_key_file(tmp_path_factory.mktemp("key") / "pseudonym.key")


SYNTAXES = {"explicit-le": ExplicitVRLittleEndian, "explicit-be": ExplicitVRBigEndian,
            "deflated": DeflatedExplicitVRLittleEndian, "implicit-le": ImplicitVRLittleEndian}


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
@pytest.mark.parametrize("where", ["top", "nested"])
def test_sequences_encoded_as_un_are_cleaned(syntax: str, undefined: bool, where: str,
                                             pseudonyms: Pseudonymizer) -> None:
    """Referenced Series Sequence (kept and walked by the profile) written with VR UN, at
    the top level or inside an SQ item, with items two deep: nothing identifying stays."""
    ds = instance()
    elem = un_element(REFERENCED_SERIES, [identifying_item(2), identifying_item(1)], undefined)
    if where == "top":
        ds[REFERENCED_SERIES] = elem
    else:
        outer = Dataset()
        outer[REFERENCED_SERIES] = elem
        ds.RelatedSeriesSequence = [outer]  # walked by the profile, like the UN one
    data = file_bytes(ds, SYNTAXES[syntax])
    assert syntax == "deflated" or all(s.encode() in data for s in SECRETS)
    output = deidentified(data, pseudonyms)
    assert not leaked(output), f"leaked {leaked(output)}"
    back = pydicom.dcmread(io.BytesIO(output))
    kept = back[REFERENCED_SERIES] if where == "top" else \
        back.RelatedSeriesSequence[0][REFERENCED_SERIES]
    assert kept.VR == "SQ" and len(kept.value) == 2  # walked and kept, not dropped


@pytest.mark.parametrize("syntax", ["explicit-le", "explicit-be", "deflated"])
@pytest.mark.parametrize("where", ["top", "nested"])
def test_a_large_un_sequence_is_cleaned(syntax: str, where: str,
                                        pseudonyms: Pseudonymizer) -> None:
    """pydicom leaves UN values of 64 KiB or more undecoded: they are walked all the same."""
    ds = instance()
    items = [identifying_item(2) for _ in range(400)]
    elem = un_element(REFERENCED_SERIES, items, False)
    assert elem.length > 0xFFFF
    holder = Dataset() if where == "nested" else ds
    holder[REFERENCED_SERIES] = elem
    if where == "nested":
        ds.RelatedSeriesSequence = [holder]
    output = deidentified(file_bytes(ds, SYNTAXES[syntax]), pseudonyms)
    assert not leaked(output)
    back = pydicom.dcmread(io.BytesIO(output))
    back = back if where == "top" else back.RelatedSeriesSequence[0]
    assert len(back[REFERENCED_SERIES].value) == 400


JUNK = {
    "no-items": b"\x01\x02" + SECRETS[0].encode() + b"\x00",
    "huge-item-length": b"\xfe\xff\x00\xe0\xff\xff\xff\x7f" + SECRETS[0].encode() * 4000,
    "huge-element-length": b"\x08\x00\x50\x00\xff\xff\xff\x7f" + SECRETS[1].encode() * 4000,
    "name-then-garbage": (b"\xfe\xff\x00\xe0\x08\x00\x00\x00\x10\x00\x10\x00\xf0\xff\x00\x00"
                          + SECRETS[0].encode() * 4000),
}


@pytest.mark.parametrize("junk", JUNK)
def test_garbage_behind_un_never_survives(junk: str, pseudonyms: Pseudonymizer) -> None:
    """Bytes under a UN sequence that are no proper items, small (pydicom decodes them) or
    large (we do): whatever the lenient parse makes of them, nothing identifying stays
    and the output is still DICOM."""
    ds = instance()
    ds[REFERENCED_SERIES] = raw_un(REFERENCED_SERIES, JUNK[junk])
    output = deidentified(file_bytes(ds, ExplicitVRLittleEndian), pseudonyms)
    assert not leaked(output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = pydicom.dcmread(io.BytesIO(output))
        list(back.iterall())
    assert back.get(REFERENCED_SERIES) is None or back[REFERENCED_SERIES].VR == "SQ"


# -- item 2: standard-group attributes no dictionary knows -----------------------------

def test_unknown_standard_attributes_are_removed_and_reported(tmp_path: Path,
                                                              pseudonyms: Pseudonymizer
                                                              ) -> None:
    ds = instance()
    unknown_top, unknown_nested = 0x00081234, 0x0020FF01  # even groups, in no dictionary
    assert not pydicom.datadict.dictionary_has_tag(unknown_top)
    ds[unknown_top] = DataElement(unknown_top, "LO", SECRETS[0])
    item = Dataset()
    item[unknown_nested] = raw_un(unknown_nested, SECRETS[1].encode())
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    ds.ReferencedImageSequence = [item]
    output_ds = pydicom.dcmread(io.BytesIO(file_bytes(ds, ExplicitVRLittleEndian)))
    deid = Deidentifier(pseudonyms)
    deid.deidentify(output_ds, "CASE")
    assert unknown_top not in output_ds
    assert unknown_nested not in output_ds.ReferencedImageSequence[0]
    assert set(deid.removed_unknown) == {"(0008,1234)", "(0020,FF01)"}
    # The steward's report names each removal, per file.
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "a.dcm").write_bytes(file_bytes(ds, ExplicitVRLittleEndian))
    report = run_cli(src, dst, tmp_path)
    assert report["files_written"] == 1
    assert sorted(report["outputs"][0]["removed_unknown"]) == ["(0008,1234)", "(0020,FF01)"]
    assert not any(leaked(p.read_bytes()) for p in dst.rglob("*.dcm"))


# -- item 3: inputs sharing a SOP Instance UID ------------------------------------------

def run_cli(src: Path, dst: Path, tmp_path: Path, *options: str) -> dict:
    report = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["spoke", "deidentify", str(src), str(dst), "--key",
                                      str(tmp_path / "cli.key"), "--report", str(report),
                                      *options])
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())


def test_pydicom_test_files_sharing_uids_are_never_overwritten(tmp_path: Path) -> None:
    """pydicom's own test files: several inputs share one SOP Instance UID. Each file
    written is really on disk, and every other input is excluded with a reason."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i, name in enumerate(get_testdata_files("*.dcm")):
        shutil.copy(name, src / f"{i:03d}-{Path(name).name}")
    # OCR is beside the point here (and costs a second per ultrasound of pydicom's)
    report = run_cli(src, dst, tmp_path, "--text-detection", "off")
    on_disk = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert report["files_written"] == len(on_disk)
    assert sorted(o["output"] for o in report["outputs"]) == on_disk
    assert report["files_written"] + report["excluded"] == report["files_seen"]
    collisions = report["reasons"].get("uid-collision", 0)
    duplicates = report["reasons"].get("duplicate-instance", 0)
    assert collisions + duplicates > 0  # pydicom's files really do share UIDs
    verdicts = {v["path"]: v for v in report["screening"]["files"]}
    for verdict in verdicts.values():
        for finding in verdict["findings"]:
            if finding["reason"] in ("uid-collision", "duplicate-instance"):
                assert verdict["status"] == "excluded"
                kept = finding["detail"].split(" as ", 1)[1].split(";")[0]
                assert kept in {o["source"] for o in report["outputs"]}


@pytest.mark.parametrize("syntax", ["explicit-le", "explicit-be"])
def test_un_sequences_are_cleaned_without_pydicoms_un_replacement(
        syntax: str, pseudonyms: Pseudonymizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine does not rely on pydicom's global ``replace_un_with_known_vr``."""
    monkeypatch.setattr(pydicom.config, "replace_un_with_known_vr", False)
    ds = instance()
    ds[REFERENCED_SERIES] = un_element(REFERENCED_SERIES, [identifying_item(2)], False)
    output = deidentified(file_bytes(ds, SYNTAXES[syntax]), pseudonyms)
    assert not leaked(output)
    assert len(pydicom.dcmread(io.BytesIO(output))[REFERENCED_SERIES].value) == 1


def test_the_spoke_store_reports_unknown_attributes_it_removed(tmp_path: Path,
                                                               pseudonyms: Pseudonymizer
                                                               ) -> None:
    """The spoke's ingest path names each removal in the instance's review note (which the
    catalog keeps as the input's reason, shown by ``tributary spoke exclusions``)."""
    from tributary.spoke.store import Preparer

    ds = instance()
    ds[0x00081234] = DataElement(0x00081234, "LO", SECRETS[0])
    path = tmp_path / "a.dcm"
    path.write_bytes(file_bytes(ds, ExplicitVRLittleEndian))
    prepared = Preparer(pseudonyms).from_file(path)
    assert prepared.review is not None and "(0008,1234)" in prepared.review
    assert not leaked(prepared.data)


def test_a_second_run_into_the_same_folder_reports_what_is_there(tmp_path: Path) -> None:
    """Two inputs with one SOP Instance UID and other content, and an exact copy: one file
    written, one collision, one duplicate; a second run into the same DST neither
    overwrites nor miscounts."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    first, other = instance(), instance()
    other.PixelData = bytes([9, 9, 9, 9])
    (src / "a.dcm").write_bytes(file_bytes(first, ExplicitVRLittleEndian))
    (src / "b.dcm").write_bytes(file_bytes(first, ExplicitVRLittleEndian))
    (src / "c.dcm").write_bytes(file_bytes(other, ExplicitVRLittleEndian))
    for _ in range(2):
        report = run_cli(src, dst, tmp_path)
        on_disk = [p for p in dst.rglob("*") if p.is_file()]
        assert report["files_seen"] == 3 and report["files_written"] == len(on_disk) == 1
        assert report["reasons"] == {"duplicate-pixels": 1, "uid-collision": 1}
        assert report["outputs"][0]["source"].endswith("a.dcm")
