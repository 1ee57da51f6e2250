"""Synthetic DICOM carrying identifiers everywhere a real export hides them: person names,
IDs, dates, nested sequences, private blocks (with a nested private sequence), SR
content, overlays and the file meta group."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from tributary.spoke.deid import DeidOptions
from tributary.spoke.pseudonyms import Pseudonymizer
from tributary.spoke.store import Preparer

ROOT_UID = "1.2.3.4.55555"


def _item(**values: object) -> Dataset:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return item


def patient_instance(patient: int, instance: int, *, series: int = 1,
                     position: float | None = None, pixels: np.ndarray | None = None,
                     image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
                     sop_class: str = CTImageStorage) -> Dataset:
    """One CT slice of synthetic patient ``patient``; every identifying value contains
    the patient number so a leak is easy to attribute."""
    p = patient
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{ROOT_UID}.{p}.{series}.{instance}"
    ds.StudyInstanceUID = f"{ROOT_UID}.{p}.77"
    ds.SeriesInstanceUID = f"{ROOT_UID}.{p}.{series}"
    ds.FrameOfReferenceUID = f"{ROOT_UID}.{p}.88"
    ds.PatientName = f"Oxbridge{p}^Jonathan{p}^Q"
    ds.PatientID = f"MRN-{p:06d}"
    ds.PatientBirthDate = f"19{40 + p % 50:02d}0612"
    ds.PatientSex = "F"
    ds.PatientAge = "071Y"
    ds.PatientWeight = 61.5
    ds.PatientAddress = f"{p} Larkspur Lane, Tinytown"
    ds.OtherPatientIDsSequence = [_item(PatientID=f"ALT-{p:06d}", IssuerOfPatientID="ZZHOSP")]
    ds.StudyDate, ds.StudyTime = "20210314", "101500"
    ds.SeriesDate, ds.AcquisitionDate, ds.ContentDate = "20210314", "20210314", "20210314"
    ds.AcquisitionDateTime = "20210314101733.123"
    ds.AccessionNumber = f"ACC{p:07d}"
    ds.StudyID = f"ST{p:05d}"
    ds.InstitutionName = "Saint Quintessa Infirmary"
    ds.InstitutionAddress = "1 Quayside Road, Porthmere"
    ds.ReferringPhysicianName = f"Vandersloot{p}^Maribel"
    ds.OperatorsName = "Tech^Thaddeus"
    ds.StationName = "QUINT-CT-07"
    ds.DeviceSerialNumber = "SN-99117733"
    ds.StudyDescription = f"CT chest for Oxbridge{p} MRN-{p:06d}"
    ds.SeriesDescription = "Axial 1mm"
    ds.ImageComments = f"Jonathan{p} was uncooperative"
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.SeriesNumber = series
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, float(instance if position is None else position)]
    ds.SliceThickness = 1
    ds.RequestAttributesSequence = [_item(
        RequestedProcedureID=f"RP-{p:06d}", ScheduledProcedureStepID=f"SPS-{p:06d}",
        ReferencedStudySequence=[_item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                                       ReferencedSOPInstanceUID=f"{ROOT_UID}.{p}.99")])]
    ds.ReferencedImageSequence = [_item(ReferencedSOPClassUID=CTImageStorage,
                                        ReferencedSOPInstanceUID=f"{ROOT_UID}.{p}.{series}.1")]
    ds.ContentSequence = [_item(
        RelationshipType="HAS OBS CONTEXT", ValueType="PNAME",
        PersonName=f"Observer{p}^Ophelia",
        ConceptNameCodeSequence=[_item(CodeValue="121008", CodingSchemeDesignator="DCM",
                                       CodeMeaning="Person Observer Name")]),
        _item(RelationshipType="CONTAINS", ValueType="TEXT",
              TextValue=f"Findings discussed with Oxbridge{p} by Vandersloot{p}",
              ConceptNameCodeSequence=[_item(CodeValue="121071", CodingSchemeDesignator="DCM",
                                             CodeMeaning="Finding")])]
    block = ds.private_block(0x0009, "ZZACME 1.0", create=True)
    block.add_new(0x01, "LO", f"Oxbridge{p} private note")
    block.add_new(0x02, "SQ", Sequence([_item(PatientName=f"Hidden{p}^Henrietta",
                                              PatientID=f"HID-{p:06d}")]))
    rows = cols = 16
    if pixels is None:
        pixels = (np.arange(rows * cols, dtype=np.uint16).reshape(rows, cols) * (p + 3)
                  + instance * 7 + series)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", cols)
    ds.add_new(0x60003000, "OW", b"\x01\x00" * (rows * cols // 16))
    ds.add_new(0x60004000, "LT", f"Overlay says Oxbridge{p}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "QUINTPACS"
    ds.file_meta = meta
    return ds


def identifying_values(patient: int) -> list[str]:
    """What must never appear in any output byte, whichever options are chosen."""
    p = patient
    return [f"Oxbridge{p}", f"Jonathan{p}", f"MRN-{p:06d}", f"ALT-{p:06d}", f"HID-{p:06d}",
            f"Hidden{p}", "Larkspur", f"ACC{p:07d}", f"ST{p:05d}", "Quintessa",
            "Quayside", f"Vandersloot{p}", "Thaddeus", f"RP-{p:06d}", f"SPS-{p:06d}",
            f"Observer{p}", "QUINTPACS", "ZZACME", f"{ROOT_UID}.{p}", "20210314",
            f"19{40 + p % 50:02d}0612"]


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def screen_capture(patient: int) -> Dataset:
    return patient_instance(patient, 1, series=9, image_type=("DERIVED", "SECONDARY",
                                                              "SCREEN SAVE"),
                            sop_class=SecondaryCaptureImageStorage)


def prepare(tmp_path: Path, ds: Dataset, options: DeidOptions) -> Dataset:
    """``ds`` through the spoke's store preparation, read back with its review notes."""
    preparer = Preparer(Pseudonymizer.from_key_file(tmp_path / "key"), options)
    prepared = preparer.from_file(write(ds, tmp_path / f"in-{ds.SOPInstanceUID}.dcm"))
    out = pydicom.dcmread(io.BytesIO(prepared.data))
    out.review = prepared.review  # type: ignore[attr-defined]
    return out
