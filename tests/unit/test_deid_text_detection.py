"""Burned-in text is found, not only masked where a site knew to mask: images of the kinds
that carry text (secondary capture, ultrasound...) are read with OCR (the real Tesseract);
text found excludes the image with its regions in the report, or is blanked under Clean
Pixel Data; a text-free image passes. Through the same path the spoke's store uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from deid_samples import patient_instance, prepare, write
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage, UltrasoundImageStorage

from tributary.services.ocr import ensure_tesseract
from tributary.spoke.deid import DeidOptions, Screener
from tributary.spoke.deid.text_detection import detect_text
from tributary.spoke.store import Excluded

ROWS, COLUMNS = 240, 320
#: Where the burned-in banner is drawn: (x, y) of its top left corner.
BANNER = (12, 10)
NAME = "OXBRIDGE^JONATHAN  MRN 004711"


@pytest.fixture(scope="module", autouse=True)
def tesseract() -> None:
    ensure_tesseract()


def anatomy(rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    """A smooth, text-free picture: an ellipse of 'tissue' with a gradient and mild noise."""
    y, x = np.mgrid[0:rows, 0:columns]
    inside = ((x - columns / 2) / (columns * 0.4)) ** 2 + ((y - rows / 2) / (rows * 0.4)) ** 2
    picture = np.where(inside < 1, 90 + 60 * (1 - inside), 10).astype(np.float64)
    picture += np.random.default_rng(7).normal(0, 3, picture.shape)
    return np.clip(picture, 0, 255).astype(np.uint8)


def with_text(picture: np.ndarray, text: str = NAME) -> np.ndarray:
    image = Image.fromarray(picture)
    ImageDraw.Draw(image).text(BANNER, text, fill=255, font=ImageFont.load_default(size=16))
    return np.asarray(image)


def image_instance(picture: np.ndarray, sop_class: str, modality: str,
                   rgb: bool = False) -> pydicom.Dataset:
    ds = patient_instance(1, 1, sop_class=sop_class,
                          image_type=("DERIVED", "SECONDARY") if sop_class ==
                          SecondaryCaptureImageStorage else ("ORIGINAL", "PRIMARY"))
    for tag in [e.tag for e in ds if e.tag.group == 0x6000]:
        del ds[tag]
    ds.Modality = modality
    ds.Rows, ds.Columns = picture.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if rgb:
        colour = np.stack([picture, picture, (picture * 0.8).astype(np.uint8)], axis=-1)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "RGB"
        ds.PlanarConfiguration = 0
        ds.PixelData = colour.tobytes()
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = picture.tobytes()
    return ds



def covers_banner(box: tuple[int, int, int, int]) -> bool:
    x, y, _width, height = box
    return x <= BANNER[0] + 40 and y <= BANNER[1] + 4 and y + height >= BANNER[1] + 10


def test_a_name_burned_into_a_secondary_capture_excludes_it_with_the_region(
        tmp_path: Path) -> None:
    ds = image_instance(with_text(anatomy()), SecondaryCaptureImageStorage, "OT")
    path = write(ds, tmp_path / "sc.dcm")
    screener = Screener(DeidOptions())
    kept, verdict = screener.check(path)
    assert kept is None and verdict.status == "excluded"
    assert "burned-in-text" in [f.reason for f in verdict.findings]
    assert verdict.text_regions and any(covers_banner(r.box) for r in verdict.text_regions)
    assert all(r.y < 40 for r in verdict.text_regions), "only the banner holds text"
    report = screener.report().model_dump_json()
    assert "OXBRIDGE" not in report and "4711" not in report  # regions, never the text
    with pytest.raises(Excluded, match="burned-in-text: OCR found"):
        prepare(tmp_path, ds, DeidOptions())


def test_under_clean_pixel_data_the_text_found_in_an_ultrasound_is_blanked(
        tmp_path: Path) -> None:
    picture = anatomy()
    texted = with_text(picture)
    ds = image_instance(texted, UltrasoundImageStorage, "US", rgb=True)
    out = prepare(tmp_path, ds, DeidOptions(clean_pixel_data=True))
    assert "burned-in-text-cleaned" in out.review and out.BurnedInAnnotation == "NO"
    pixels = out.pixel_array
    glyphs = texted != picture  # every pixel the text was drawn on
    assert glyphs.sum() > 300
    assert (pixels[glyphs] == 0).all(), "every pixel of the text is black"
    assert not detect_text(out), "nothing readable is left"
    below = pixels[60:, :, 0]  # the picture away from the banner is untouched
    assert (below == picture[60:, :]).all()


def test_a_text_free_capture_and_ultrasound_pass(tmp_path: Path) -> None:
    for sop_class, modality, rgb in ((SecondaryCaptureImageStorage, "OT", False),
                                     (UltrasoundImageStorage, "US", True)):
        ds = image_instance(anatomy(), sop_class, modality, rgb=rgb)
        path = write(ds, tmp_path / f"{modality}.dcm")
        kept, verdict = Screener(DeidOptions()).check(path)
        assert kept is not None and not verdict.text_regions
        assert not {"burned-in-text", "text-detection-failed"} & \
            {f.reason for f in verdict.findings}


def test_text_detection_follows_the_studys_scope(tmp_path: Path) -> None:
    """A CT is not a text-prone kind: read only when the study asks for every image."""
    ct = image_instance(with_text(anatomy()), CTImageStorage, "CT")
    path = write(ct, tmp_path / "ct.dcm")
    assert Screener(DeidOptions()).check(path)[0] is not None
    assert Screener(DeidOptions(text_detection="all")).check(path)[1].excluded
    sc = write(image_instance(with_text(anatomy()), SecondaryCaptureImageStorage, "OT"),
               tmp_path / "sc.dcm")
    assert Screener(DeidOptions(text_detection="off")).check(sc)[0] is not None


def test_pixels_that_cannot_be_read_keep_the_image_out(tmp_path: Path) -> None:
    ds = image_instance(anatomy(), SecondaryCaptureImageStorage, "OT")
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # shorter than Rows x Columns
    kept, verdict = Screener(DeidOptions()).check(write(ds, tmp_path / "short.dcm"))
    assert kept is None
    assert [f.reason for f in verdict.findings if f.reason.startswith("text")] == [
        "text-detection-failed"]


def test_the_stewards_command_reports_the_regions_and_obeys_the_flag(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tributary.cli.app import app

    source = tmp_path / "src"
    write(image_instance(with_text(anatomy()), SecondaryCaptureImageStorage, "OT"),
          source / "capture.dcm")
    key = tmp_path / "steward.key"
    result = CliRunner().invoke(app, ["spoke", "deidentify", str(source),
                                      str(tmp_path / "out"), "--key", str(key)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out-report.json").read_text())
    assert report["files_written"] == 0 and report["reasons"]["burned-in-text"] == 1
    [verdict] = report["screening"]["files"]
    assert any(covers_banner((r["x"], r["y"], r["width"], r["height"]))
               for r in verdict["text_regions"])
    skipped = CliRunner().invoke(app, ["spoke", "deidentify", str(source),
                                       str(tmp_path / "off"), "--key", str(key),
                                       "--text-detection", "off"])
    assert skipped.exit_code == 0, skipped.output
    assert json.loads((tmp_path / "off-report.json").read_text())["files_written"] == 1
    bad = CliRunner().invoke(app, ["spoke", "deidentify", str(source), str(tmp_path / "x"),
                                   "--key", str(key), "--text-detection", "some"])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()


def test_text_in_a_multi_frame_ultrasound_is_blanked_in_every_frame(tmp_path: Path) -> None:
    picture = anatomy()
    texted = with_text(picture)
    ds = image_instance(texted, UltrasoundImageStorage, "US")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.NumberOfFrames = 5
    ds.PixelData = np.stack([texted] * 5).tobytes()
    out = prepare(tmp_path, ds, DeidOptions(clean_pixel_data=True))
    glyphs = texted != picture
    assert (out.pixel_array[:, glyphs] == 0).all()
