"""Generate synthetic chest CT cohorts with known lung nodules.

Why: the platform needs realistic-looking hospital data to test against without touching
real patients. Every case is one axial CT series stored as valid DICOM (CT Image Storage,
Explicit VR Little Endian) carrying *fake but realistic* patient identifiers in all the
places a hospital's files carry them — including the folder name, a private tag block and
the institution — so that de-identification can be tested, plus a ``ground_truth.json``
with every nodule's centre and diameter in patient coordinates, so that an algorithm's
results can be checked.

Usage::

    python examples/synthetic_ct/generate.py --out cohort --cases 30 --seed 7

The output is deterministic for a given seed (UIDs included), and case *i* does not
depend on how many cases are generated.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

DEFAULT_SITE = "Riverside General Hospital"
AIR_HU = -1000.0
SOFT_TISSUE_HU = 40.0
LUNG_HU = -850.0
NODULE_HU = 40.0
BONE_HU = 600.0
NOISE_SD_HU = 12.0
RESCALE_INTERCEPT = -1024.0
NODULE_DIAMETER_MM = (8.0, 20.0)


@dataclass(frozen=True)
class Scanner:
    """How one site's scanner differs: a calibration error (HU' = scale * HU + offset), a
    noise level and a slice thickness. With ``--scanner N`` the sites of a federation do
    not hold identically distributed images (federated training must cope with that);
    without it every case is written as before."""

    model: str
    hu_offset: float
    hu_scale: float
    noise_sd_hu: float
    slice_thickness_mm: float


#: ``--scanner N`` picks ``SCANNERS[N % len(SCANNERS)]``; 0 matches the default images.
SCANNERS = (
    Scanner("Phantom 160", 0.0, 1.0, 12.0, 2.5),
    Scanner("Phantom 200 HD", 60.0, 0.92, 25.0, 3.0),
    Scanner("Phantom 120 LD", -45.0, 1.08, 6.0, 3.5),
)
DEFAULT_SCANNER = SCANNERS[0]

#: Minimum distance between a nodule's surface and the lung wall, the scan's first/last
#: slice or another nodule: keeps ground truth unambiguous for a detector.
WALL_MARGIN_MM = 5.0

_FIRST_F = [
    "JANE",
    "MARIA",
    "ANNA",
    "SOPHIE",
    "LAURA",
    "EMMA",
    "CLAIRE",
    "NORA",
    "ELLEN",
    "RUTH",
    "HELEN",
    "IRIS",
    "MARTHA",
    "LINDA",
    "GRACE",
    "ALICE",
]
_FIRST_M = [
    "JOHN",
    "PETER",
    "MARK",
    "DAVID",
    "THOMAS",
    "PAUL",
    "HENRY",
    "LUKAS",
    "JAMES",
    "SIMON",
    "ROBERT",
    "WALTER",
    "FRANK",
    "OSCAR",
    "VICTOR",
    "EDWARD",
]
_LAST = [
    "DOE",
    "SMITH",
    "JANSEN",
    "MUELLER",
    "MARTIN",
    "BAKKER",
    "ROSSI",
    "NOVAK",
    "KOWALSKI",
    "DUBOIS",
    "HANSEN",
    "SILVA",
    "MOREAU",
    "VISSER",
    "FISCHER",
    "KELLY",
    "BROWN",
    "WEBER",
    "LINDQVIST",
    "OCONNOR",
]
_STREETS = [
    "Elm Street",
    "Mill Lane",
    "Harbour Road",
    "Church Street",
    "Station Road",
    "Oak Avenue",
    "Kingsway",
    "Park Crescent",
    "Canal Street",
    "Meadow Drive",
]
_CITIES = ["Northfield", "Easton", "Westbury", "Southport", "Lakeside", "Hillcrest"]
_PHYSICIANS = [
    "DR^HOUSE^GREGORY",
    "DR^GREY^MEREDITH",
    "DR^KILDARE^JAMES",
    "DR^QUINN^MICHAELA",
    "DR^ROSS^DOUG",
    "DR^WELBY^MARCUS",
]
_OPERATORS = ["TECH^ADAMS", "TECH^BAKER", "TECH^CLARK", "TECH^DIAZ", "TECH^EVANS"]


@dataclass(frozen=True)
class Nodule:
    """A solid spherical nodule in patient coordinates (mm)."""

    center_mm: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class Geometry:
    """How voxel indices map to patient coordinates (identity orientation, axial)."""

    size: int
    slices: int
    pixel_spacing: float
    slice_spacing: float
    origin: tuple[float, float, float]  # patient position of voxel (slice 0, row 0, col 0)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x per column, y per row, z per slice (ascending z), in mm."""
        x = self.origin[0] + np.arange(self.size) * self.pixel_spacing
        y = self.origin[1] + np.arange(self.size) * self.pixel_spacing
        z = self.origin[2] + np.arange(self.slices) * self.slice_spacing
        return x, y, z


@dataclass(frozen=True)
class Ellipsoid:
    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """< 1 inside, 1 on the surface (broadcasts over the arrays)."""
        return (
            ((x - self.center[0]) / self.semi_axes[0]) ** 2
            + ((y - self.center[1]) / self.semi_axes[1]) ** 2
            + ((z - self.center[2]) / self.semi_axes[2]) ** 2
        )


def _sphere_points(count: int = 256) -> np.ndarray:
    """Evenly spread unit vectors (Fibonacci sphere) to test a ball against a wall."""
    i = np.arange(count) + 0.5
    polar = np.arccos(1 - 2 * i / count)
    azimuth = np.pi * (1 + 5**0.5) * i
    return np.stack(
        [np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1
    )


_UNIT_SPHERE = _sphere_points()


def _place_nodules(
    rng: np.random.Generator, count: int, lungs: list[Ellipsoid], z_range: tuple[float, float]
) -> list[Nodule]:
    """Rejection-sample non-overlapping nodules lying well inside a lung."""
    nodules: list[Nodule] = []
    attempts = 0
    while len(nodules) < count:
        attempts += 1
        if attempts > 10_000:
            raise RuntimeError("could not place nodules; lungs too small for the margins")
        diameter = round(float(rng.uniform(*NODULE_DIAMETER_MM)), 1)
        lung = lungs[int(rng.integers(len(lungs)))]
        center = np.array(lung.center) + rng.uniform(-1, 1, 3) * np.array(lung.semi_axes)
        center = np.round(center, 2)
        reach = diameter / 2 + WALL_MARGIN_MM
        if center[2] - reach < z_range[0] or center[2] + reach > z_range[1]:
            continue
        surface = center + _UNIT_SPHERE * reach
        if np.any(lung.level(surface[:, 0], surface[:, 1], surface[:, 2]) >= 1.0):
            continue
        if any(
            np.linalg.norm(center - np.array(other.center_mm))
            < (diameter + other.diameter_mm) / 2 + WALL_MARGIN_MM
            for other in nodules
        ):
            continue
        nodules.append(Nodule(center_mm=tuple(float(c) for c in center), diameter_mm=diameter))
    return nodules


def _render_nodule(volume: np.ndarray, geo: Geometry, nodule: Nodule) -> None:
    """Blend a sphere into the volume with partial-volume edges (3x3x3 supersampling),
    so that a threshold half-way between lung and nodule recovers its true size."""
    x, y, z = geo.axes()
    radius = nodule.diameter_mm / 2
    cx, cy, cz = nodule.center_mm

    def span(axis: np.ndarray, centre: float) -> slice:
        inside = np.nonzero(np.abs(axis - centre) <= radius + 2 * geo.slice_spacing)[0]
        return slice(int(inside[0]), int(inside[-1]) + 1)

    zs, ys, xs = span(z, cz), span(y, cy), span(x, cx)
    offsets = (np.arange(3) - 1) / 3.0
    fraction = np.zeros((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start))
    for oz in offsets:
        zz = (z[zs] + oz * geo.slice_spacing - cz)[:, None, None] ** 2
        for oy in offsets:
            yy = (y[ys] + oy * geo.pixel_spacing - cy)[None, :, None] ** 2
            for ox in offsets:
                xx = (x[xs] + ox * geo.pixel_spacing - cx)[None, None, :] ** 2
                fraction += (zz + yy + xx) <= radius**2
    fraction /= 27.0
    block = volume[zs, ys, xs]
    volume[zs, ys, xs] = block * (1 - fraction) + NODULE_HU * fraction


def _identity(rng: np.random.Generator, index: int, site: str) -> dict[str, Any]:
    """A fake but realistic patient and study, as a hospital's PACS would file them."""
    female = bool(rng.integers(2))
    first = str(rng.choice(_FIRST_F if female else _FIRST_M))
    last = str(rng.choice(_LAST))
    mrn = f"{int(rng.integers(1_000_000, 9_999_999)):07d}"
    study = dt.datetime(2024, 1, 1) + dt.timedelta(
        days=int(rng.integers(0, 365)), seconds=int(rng.integers(7 * 3600, 19 * 3600))
    )
    birth = dt.date(
        int(rng.integers(1940, 1996)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    )
    age = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    city = str(rng.choice(_CITIES))
    return {
        "folder": f"MRN{mrn}_{last}_{first}",
        "PatientName": f"{last}^{first}",
        "PatientID": f"MRN{mrn}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": "F" if female else "M",
        "PatientAge": f"{age:03d}Y",
        "PatientAddress": f"{int(rng.integers(1, 250))} {rng.choice(_STREETS)}, {city}",
        "PatientTelephoneNumbers": f"+44 1632 {int(rng.integers(100000, 999999))}",
        "OtherPatientIDs": f"NHS{int(rng.integers(100_000_000, 999_999_999))}",
        "InstitutionName": site,
        "InstitutionAddress": f"{int(rng.integers(1, 99))} Hospital Road, {city}",
        "InstitutionalDepartmentName": "Radiology",
        "StationName": f"CT{int(rng.integers(1, 4)):02d}",
        "ReferringPhysicianName": str(rng.choice(_PHYSICIANS)),
        "PerformingPhysicianName": str(rng.choice(_PHYSICIANS)),
        "OperatorsName": str(rng.choice(_OPERATORS)),
        "AccessionNumber": f"A{int(rng.integers(10_000_000, 99_999_999))}",
        "StudyID": str(int(rng.integers(1000, 99999))),
        "StudyDate": study.strftime("%Y%m%d"),
        "StudyTime": study.strftime("%H%M%S"),
        "index": index,
    }


def _case_geometry(rng: np.random.Generator, size: int, slices: int,
                   slice_spacing: float = 2.5) -> Geometry:
    spacing = round(float(rng.uniform(1.9, 2.1)), 4)
    half = round((size - 1) / 2 * spacing, 4)  # as stored in ImagePositionPatient
    table = round(float(rng.uniform(-250.0, -150.0)), 2)
    return Geometry(
        size=size,
        slices=slices,
        pixel_spacing=spacing,
        slice_spacing=slice_spacing,
        origin=(-half, -half, table),
    )


def _anatomy(rng: np.random.Generator, geo: Geometry) -> tuple[np.ndarray, list[Ellipsoid]]:
    """Air, an elliptical soft-tissue body with a spine, and two ellipsoidal lungs (HU)."""
    x, y, z = geo.axes()
    fov = geo.size * geo.pixel_spacing / 2
    body_a = float(rng.uniform(0.78, 0.86)) * fov  # left-right semi-axis
    body_b = float(rng.uniform(0.56, 0.64)) * fov  # anterior-posterior semi-axis
    z_mid = (z[0] + z[-1]) / 2
    X, Y = x[None, None, :], y[None, :, None]
    Z = z[:, None, None]
    volume = np.full((geo.slices, geo.size, geo.size), AIR_HU, dtype=np.float32)
    x2, y2 = x[None, :], y[:, None]
    volume[:, (x2 / body_a) ** 2 + (y2 / body_b) ** 2 <= 1.0] = SOFT_TISSUE_HU
    volume[:, x2**2 + (y2 - 0.72 * body_b) ** 2 <= (0.12 * body_b) ** 2] = BONE_HU
    lungs = []
    for side in (-1.0, 1.0):
        lung = Ellipsoid(
            center=(
                side * float(rng.uniform(0.42, 0.48)) * body_a,
                -float(rng.uniform(0.0, 0.08)) * body_b,
                z_mid + float(rng.uniform(-15.0, 15.0)),
            ),
            semi_axes=(
                float(rng.uniform(0.30, 0.35)) * body_a,
                float(rng.uniform(0.58, 0.64)) * body_b,
                float(rng.uniform(70.0, 95.0)),
            ),
        )
        volume[lung.level(X, Y, Z) <= 1.0] = LUNG_HU
        lungs.append(lung)
    return volume, lungs


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=["tributary-synthetic-ct", str(seed), *map(str, parts)])


def _write_series(
    folder: Path, volume_hu: np.ndarray, geo: Geometry, who: dict[str, Any], seed: int,
    model: str = DEFAULT_SCANNER.model,
) -> None:
    """Store the volume as one axial CT series, one file per slice, head first."""
    folder.mkdir(parents=True)
    _, _, z = geo.axes()
    stored = np.clip(np.rint(volume_hu - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
    index = who["index"]
    study_uid = _uid(seed, index, "study")
    series_uid = _uid(seed, index, "series")
    frame_uid = _uid(seed, index, "frame")

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    for key in ("StudyDate", "StudyTime"):
        setattr(ds, key, who[key])
    ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = who["StudyDate"]
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = who["StudyTime"]
    ds.AccessionNumber = who["AccessionNumber"]
    ds.Modality = "CT"
    ds.Manufacturer = "Tributary Synthetic"
    ds.ManufacturerModelName = model
    for key in (
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "StationName",
        "InstitutionalDepartmentName",
        "PerformingPhysicianName",
        "OperatorsName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "PatientAddress",
        "PatientTelephoneNumbers",
    ):
        setattr(ds, key, who[key])
    ds.StudyDescription = "CT THORAX"
    ds.SeriesDescription = f"Thorax {geo.slice_spacing:g}mm"
    ds.OtherPatientIDsSequence = [Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID = who["OtherPatientIDs"]
    ds.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = f"{geo.slice_spacing:g}"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = who["StudyID"]
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = geo.size
    ds.PixelSpacing = [f"{geo.pixel_spacing:g}", f"{geo.pixel_spacing:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    block = ds.private_block(0x0029, "RIVERSIDE PACS 2.1", create=True)
    block.add_new(0x10, "LO", who["PatientID"])
    block.add_new(0x11, "LO", who["PatientName"].replace("^", " "))
    block.add_new(0x12, "LO", f"{who['AccessionNumber']} {who['InstitutionName']}"[:64])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    for instance, k in enumerate(range(geo.slices - 1, -1, -1), start=1):  # head first
        sop_uid = _uid(seed, index, "image", k)
        meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = instance
        position = [geo.origin[0], geo.origin[1], float(z[k])]
        ds.ImagePositionPatient = [f"{v:.4f}".rstrip("0").rstrip(".") for v in position]
        ds.SliceLocation = f"{z[k]:.4f}".rstrip("0").rstrip(".")
        ds.PixelData = stored[k].tobytes()
        ds.save_as(folder / f"IM{instance:05d}.dcm", enforce_file_format=True)


def generate_case(
    out: Path,
    index: int,
    seed: int,
    nodule_count: int,
    site: str = DEFAULT_SITE,
    size: int = 160,
    slices: int = 40,
    scanner: Scanner | None = None,
) -> tuple[str, str, list[Nodule]]:
    """Write case number ``index`` of a cohort; return its folder name, patient ID and
    nodules. ``scanner`` (None: the default images) changes calibration, noise and slice
    thickness, never the anatomy, identities or nodule counts."""
    profile = scanner or DEFAULT_SCANNER
    rng = np.random.default_rng([seed, index])
    who = _identity(rng, index, site)
    geo = _case_geometry(rng, size, slices, profile.slice_thickness_mm)
    volume, lungs = _anatomy(rng, geo)
    _, _, z = geo.axes()
    nodules = _place_nodules(rng, nodule_count, lungs, (float(z[0]), float(z[-1])))
    for nodule in nodules:
        _render_nodule(volume, geo, nodule)
    if scanner is not None:
        volume = volume * np.float32(profile.hu_scale) + np.float32(profile.hu_offset)
    noise_sd = NOISE_SD_HU if scanner is None else profile.noise_sd_hu
    volume += rng.normal(0.0, noise_sd, volume.shape).astype(np.float32)
    folder = out / who["folder"]
    if folder.exists():
        shutil.rmtree(folder)
    _write_series(folder, volume, geo, who, seed, profile.model)
    return who["folder"], who["PatientID"], nodules


def generate_cohort(
    out: str | Path,
    cases: int,
    seed: int,
    site: str = DEFAULT_SITE,
    size: int = 160,
    slices: int = 40,
    scanner: int | None = None,
) -> dict[str, Any]:
    """Generate ``cases`` cases under ``out`` and write ``out/ground_truth.json`` (keyed by
    case folder) and ``out/attributes.csv`` (the same truth as a site would supply case
    attributes: one row per patient ID, the nodule list as JSON).

    Nodule counts 0-3 are spread evenly (in a seed-dependent order), so every cohort of
    four or more cases has cases without nodules. ``scanner`` (an index into
    :data:`SCANNERS`, e.g. the site's number) gives the site its own scanner; None writes
    the default images. Returns the ground truth.
    """
    if cases < 1:
        raise ValueError("cases must be at least 1")
    if size < 64 or slices < 16:
        raise ValueError("size must be >= 64 and slices >= 16 to hold lungs and nodules")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = np.random.default_rng([seed, 1 << 30]).permutation([i % 4 for i in range(cases)])
    truth: dict[str, Any] = {}
    rows = []
    for index in range(cases):
        folder, patient_id, nodules = generate_case(
            out, index, seed, int(counts[index]), site, size, slices,
            None if scanner is None else SCANNERS[scanner % len(SCANNERS)],
        )
        if folder in truth:
            raise RuntimeError(f"two cases drew the same identity {folder}; change the seed")
        truth[folder] = {
            "nodules": [
                {"center_mm": list(n.center_mm), "diameter_mm": n.diameter_mm} for n in nodules
            ]
        }
        rows.append(
            {
                "patient_id": patient_id,
                "nodule_count": len(nodules),
                "nodules": json.dumps(truth[folder]["nodules"]),
            }
        )
    (out / "ground_truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    with open(out / "attributes.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["patient_id", "nodule_count", "nodules"])
        writer.writeheader()
        writer.writerows(rows)
    return truth


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        description="Generate a synthetic chest CT cohort (DICOM) with known lung nodules "
        "and fake hospital identifiers, plus ground_truth.json.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--cases", required=True, type=int, help="number of cases")
    parser.add_argument("--seed", required=True, type=int, help="random seed (deterministic)")
    parser.add_argument("--site", default=DEFAULT_SITE, help="InstitutionName to write")
    parser.add_argument("--size", type=int, default=160, help="rows = columns (default 160)")
    parser.add_argument("--slices", type=int, default=40, help="slices per series (default 40)")
    parser.add_argument("--scanner", type=int, default=None, metavar="N",
                        help="this site's scanner (calibration, noise, slice thickness), "
                        f"one of {len(SCANNERS)} profiles by N mod {len(SCANNERS)}; "
                        "default: the same images as every other site")
    args = parser.parse_args(argv)
    started = time.monotonic()
    truth = generate_cohort(args.out, args.cases, args.seed, args.site, args.size, args.slices,
                            args.scanner)
    nodules = sum(len(case["nodules"]) for case in truth.values())
    print(
        f"wrote {len(truth)} cases with {nodules} nodules to {args.out} "
        f"in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
