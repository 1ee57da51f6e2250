"""De-identification throughput against baselines run in the same process on the same
files:

- plain pydicom read + write (the floor: any de-identifier has to read and write);
- the ``dicom-anonymizer`` engine (the maintained PS3.15 tool whose table we use);
- Tributary's engine, basic profile and with every option, and the steward's pipeline
  (screening + de-identification + write);
- the spoke's ingest (screening + de-identification + content-addressed store + catalog)
  in one process and with one worker per CPU, and a second (no-op) ingest;
- what finding burned-in text with OCR costs per image: screening secondary captures and
  ultrasound frames (with and without text) with text detection off and on.

    .venv/bin/python bench/bench_deid.py [--cases 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from dicomanonymizer import simpledicomanonymizer
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

from tributary.spoke.config import SpokeConfig
from tributary.spoke.deid import Deidentifier, DeidOptions, Screener
from tributary.spoke.ingest import ingest
from tributary.spoke.pseudonyms import Pseudonymizer
from tributary.testbed.federation import generate_cohort

ALL = DeidOptions(retain_modified_dates=True, retain_patient_characteristics=True,
                  retain_device_identity=True, clean_descriptors=True)


def best_of(repeat: int, run: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    root = Path(tempfile.mkdtemp(prefix="tributary-bench-"))
    try:
        generate_cohort(root / "data", args.cases, seed=5, site="Bench Hospital")
        files = sorted(p for p in (root / "data").rglob("*.dcm"))
        pseudonyms = Pseudonymizer(b"b" * 32)

        def write(ds: pydicom.Dataset) -> None:
            ds.save_as(io.BytesIO(), enforce_file_format=True)

        def plain() -> None:
            for path in files:
                write(pydicom.dcmread(path))

        def anonymizer() -> None:
            for path in files:
                ds = pydicom.dcmread(path)
                simpledicomanonymizer.anonymize_dataset(ds, {}, True)
                write(ds)

        def ours(options: DeidOptions) -> Callable[[], None]:
            deid = Deidentifier(pseudonyms, options)

            def run() -> None:
                for path in files:
                    write(deid.deidentify(pydicom.dcmread(path), "c-bench"))
            return run

        def pipeline() -> None:
            deid, screener = Deidentifier(pseudonyms), Screener(pseudonyms=pseudonyms)
            for path in files:
                ds, _ = screener.check(path)
                if ds is not None:
                    write(deid.deidentify(ds, "c-bench"))
            screener.report()

        size = sum(p.stat().st_size for p in files) / 1e6
        print(f"files: {len(files)} ({size:.1f} MB) in {args.cases} cases, best of "
              f"{args.repeat}")
        baseline = best_of(args.repeat, plain)
        rows = [("baseline: pydicom read+write", baseline),
                ("dicom-anonymizer engine", best_of(args.repeat, anonymizer)),
                ("tributary basic profile", best_of(args.repeat, ours(DeidOptions()))),
                ("tributary all options", best_of(args.repeat, ours(ALL))),
                ("tributary screen+deid+write", best_of(args.repeat, pipeline))]
        for name, seconds in rows:
            print(f"{name:<30} {len(files) / seconds:9.1f} files/s  "
                  f"{seconds / baseline:5.2f}x baseline time")
        anon, basic = rows[1][1], rows[2][1]
        print(f"tributary basic profile is {anon / basic:.1f}x faster than dicom-anonymizer")

        def config(work: str, workers: int) -> SpokeConfig:
            return SpokeConfig(spoke_id="bench", data_dir=root / "data", work_dir=root / work,
                               hub_public_key=root / "hub.pub", catalog={"workers": workers})

        t0 = time.perf_counter()
        assert ingest(config("serial", 1)).stored == len(files)
        serial = time.perf_counter() - t0
        workers = max(2, os.cpu_count() or 1)
        t0 = time.perf_counter()
        assert ingest(config("work", workers)).stored == len(files)
        parallel = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert ingest(config("work", workers)).stored == 0
        reuse = time.perf_counter() - t0
        for name, seconds in (("ingest, 1 process", serial),
                              (f"ingest, {workers} workers", parallel)):
            print(f"{name:<30} {len(files) / seconds:9.1f} files/s  "
                  f"{seconds / baseline:5.2f}x baseline time")
        print(f"ingest with {workers} workers is {serial / parallel:.2f}x one process; a "
              f"second (no-op) ingest takes {reuse * 1000:.1f} ms for all files")
        text_detection_cost(root / "ocr", args.repeat)
    finally:
        shutil.rmtree(root)


def text_image(path: Path, rows: int, columns: int, text: str | None, ultrasound: bool,
               seed: int) -> Path:
    """A synthetic capture (grey) or ultrasound frame (RGB), with ``text`` burned in."""
    y, x = np.mgrid[0:rows, 0:columns]
    inside = ((x - columns / 2) / (columns * 0.4)) ** 2 + ((y - rows / 2) / (rows * 0.4)) ** 2
    grey = np.where(inside < 1, 90 + 60 * (1 - inside), 10)
    grey = np.clip(grey + np.random.default_rng(seed).normal(0, 3, grey.shape), 0, 255)
    image = Image.fromarray(grey.astype(np.uint8))
    if text:
        ImageDraw.Draw(image).text((12, 10), text, fill=255,
                                   font=ImageFont.load_default(size=16))
    pixels = np.asarray(image)
    ds = Dataset()
    ds.SOPClassUID = UltrasoundImageStorage if ultrasound else SecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.SeriesInstanceUID, ds.PatientID = generate_uid(), f"P{seed}"
    ds.Modality = "US" if ultrasound else "OT"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if ultrasound:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = \
            3, "RGB", 0
        ds.PixelData = np.stack([pixels] * 3, axis=-1).tobytes()
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def text_detection_cost(folder: Path, repeat: int) -> None:
    """Screening time per image of the kinds OCR reads, with text detection off and on."""
    folder.mkdir(parents=True)
    kinds = {"capture 320x240, no text": (240, 320, None, False),
             "capture 320x240, a name": (240, 320, "DOE^JANE  MRN 004711", False),
             "ultrasound 640x480 RGB, a name": (480, 640, "DOE^JANE  MRN 004711", True)}
    per_kind = 4
    print(f"OCR (tesseract, pytesseract) on {per_kind} images of each kind, best of {repeat}:")
    for name, (rows, columns, text, ultrasound) in kinds.items():
        paths = [text_image(folder / f"{name[:3]}-{rows}-{bool(text)}-{i}.dcm", rows,
                            columns, text, ultrasound, i) for i in range(per_kind)]

        def screen(scope: str, paths: list[Path] = paths) -> None:
            screener = Screener(DeidOptions(text_detection=scope))  # type: ignore[arg-type]
            for path in paths:
                screener.check(path)

        off = best_of(repeat, lambda: screen("off")) / per_kind
        on = best_of(repeat, lambda: screen("text-prone")) / per_kind
        print(f"  {name:<32} screening {off * 1000:7.1f} ms/image without OCR, "
              f"{on * 1000:7.1f} ms/image with it (+{(on - off) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
