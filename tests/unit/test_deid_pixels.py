"""Clean Pixel Data (PS3.15 E.3.1): the regions a site's mask names are blanked in every
frame and sample, through the same path the spoke's store uses; everything else of the
image is unchanged; an image declaring burned-in text that no mask matches stays out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from deid_samples import patient_instance, prepare
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from tributary.spoke.config import SpokeConfig
from tributary.spoke.deid import DeidOptions, PixelMask, profile_name
from tributary.spoke.store import Excluded

TEXT = 4000  # the value of the "burned-in text" pixels
MASK = PixelMask(manufacturer="acme", rows=16, columns=16, regions=((0, 0, 16, 4), (12, 12, 4, 4)))


def burned(patient: int = 1, declared: bool = True) -> pydicom.Dataset:
    pixels = (np.arange(256, dtype=np.uint16).reshape(16, 16) % 200) + 100
    pixels[0:4, :] = TEXT  # a banner with the patient's name, as some devices write one
    pixels[12:16, 12:16] = TEXT
    ds = patient_instance(patient, 1, pixels=pixels)
    if declared:
        ds.BurnedInAnnotation = "YES"
    return ds



def blanked() -> np.ndarray:
    region = np.zeros((16, 16), dtype=bool)
    region[0:4, :] = True
    region[12:16, 12:16] = True
    return region


def test_masked_regions_are_blanked_and_the_rest_is_unchanged(tmp_path: Path) -> None:
    source = burned()
    original = source.pixel_array.copy()
    options = DeidOptions(clean_pixel_data=True, pixel_masks=(MASK,))
    out = prepare(tmp_path, source, options)
    pixels = out.pixel_array
    region = blanked()
    assert (pixels[region] == original[~region].min()).all()  # black: the lowest value
    assert (pixels[~region] == original[~region]).all()
    assert TEXT not in pixels
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert "pixels-cleaned" in out.review  # reported, for a person to look at
    assert "Clean Pixel Data" in profile_name(options)


def test_without_a_matching_mask_a_burned_in_image_stays_out(tmp_path: Path) -> None:
    other = DeidOptions(clean_pixel_data=True, pixel_masks=(
        PixelMask(manufacturer="OTHER VENDOR", regions=((0, 0, 16, 4),)),))
    with pytest.raises(Excluded, match="no pixel mask matches this device"):
        prepare(tmp_path, burned(), other)
    # Masks do nothing unless the study chose Clean Pixel Data.
    with pytest.raises(Excluded, match="does not allow burned-in annotation"):
        prepare(tmp_path, burned(), DeidOptions(pixel_masks=(MASK,)))


def test_a_known_device_is_cleaned_even_when_it_does_not_declare_burned_in_text(
        tmp_path: Path) -> None:
    out = prepare(tmp_path, burned(declared=False),
                  DeidOptions(clean_pixel_data=True, pixel_masks=(MASK,)))
    assert TEXT not in out.pixel_array and out.BurnedInAnnotation == "NO"


def test_compressed_pixels_are_decoded_cleaned_and_stored_uncompressed(tmp_path: Path) -> None:
    source = burned()
    original = source.pixel_array.copy()
    source.compress(RLELossless, generate_instance_uid=False)
    assert source.file_meta.TransferSyntaxUID == RLELossless
    out = prepare(tmp_path, source, DeidOptions(clean_pixel_data=True, pixel_masks=(MASK,)))
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    region = blanked()
    assert TEXT not in out.pixel_array
    assert (out.pixel_array[~region] == original[~region]).all()


def test_every_frame_and_colour_sample_is_blanked(tmp_path: Path) -> None:
    ds = burned()
    frames = np.full((3, 16, 16, 3), 90, dtype=np.uint8)
    frames[:, 0:4, :, :] = 250
    frames[:, 12:16, 12:16, 0] = 250  # text in the red channel only
    ds.NumberOfFrames, ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = frames.tobytes()
    out = prepare(tmp_path, ds, DeidOptions(clean_pixel_data=True, pixel_masks=(MASK,)))
    pixels = out.pixel_array
    assert pixels.shape == (3, 16, 16, 3)
    region = blanked()
    assert (pixels[:, region, :] == 0).all()
    assert (pixels[:, ~region, :] == 90).all()


def test_a_mask_outside_the_image_excludes_it_with_the_reason(tmp_path: Path) -> None:
    wrong = PixelMask(manufacturer="ACME", regions=((40, 0, 8, 8),))
    with pytest.raises(Excluded, match="outside the 16x16 image"):
        prepare(tmp_path, burned(), DeidOptions(clean_pixel_data=True, pixel_masks=(wrong,)))


def test_masks_come_from_the_spokes_configuration(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    config = tmp_path / "spoke.toml"
    config.write_text('spoke_id = "site-a"\ndata_dir = "data"\nwork_dir = "work"\n'
                      'hub_public_key = "hub.pem"\n\n[deidentification]\n'
                      "clean_pixel_data = true\n\n[[deidentification.pixel_masks]]\n"
                      'modality = "US"\nmanufacturer = "Sonaray"\nrows = 600\ncolumns = 800\n'
                      "regions = [[0, 0, 800, 60], [700, 540, 100, 60]]\n")
    options = SpokeConfig.load(config).deidentification
    assert options.clean_pixel_data
    assert options.pixel_masks[0].regions == ((0, 0, 800, 60), (700, 540, 100, 60))
    config.write_text(config.read_text().replace("[0, 0, 800, 60]", "[0, 0, 0, 60]"))
    with pytest.raises(ValueError, match="width, height >= 1"):
        SpokeConfig.load(config)
