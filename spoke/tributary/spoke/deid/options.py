"""What a study may choose on top of the Basic Application Level Confidentiality Profile.

Each flag is one PS3.15 Annex E option (its PS3.16 CID 7050 code in brackets); together
they decide the action table and the profile string recorded in custody records."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydicom.dataset import Dataset


class SafePrivate(BaseModel):
    """One private attribute the site has vetted as safe (PS3.15 E.3.10): the element
    ``(group, xxEE)`` of the block reserved by ``creator``."""

    model_config = ConfigDict(frozen=True)

    creator: str = Field(min_length=1, max_length=64)
    group: int = Field(ge=0x0009, le=0xFFFF, description="odd group number")
    element: int = Field(ge=0x00, le=0xFF, description="low byte of the element number")


class PixelMask(BaseModel):
    """Where one kind of device writes text into its pixels (PS3.15 E.3.1 Clean Pixel
    Data): rectangles to blank in every image it matches. A site writes one per device
    layout it knows, as CTP's pixel anonymizer scripts do; every criterion given must
    match (text case-insensitively, read before de-identification)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modality: str | None = None
    manufacturer: str | None = Field(None, description="Manufacturer, e.g. ACME")
    model: str | None = Field(None, description="ManufacturerModelName")
    rows: int | None = Field(None, ge=1)
    columns: int | None = Field(None, ge=1)
    #: (x, y, width, height) in pixels, from the top left corner.
    regions: tuple[tuple[int, int, int, int], ...] = Field(min_length=1)

    @field_validator("regions")
    @classmethod
    def _positive(cls, regions: tuple[tuple[int, int, int, int], ...]
                  ) -> tuple[tuple[int, int, int, int], ...]:
        for x, y, width, height in regions:
            if x < 0 or y < 0 or width < 1 or height < 1:
                raise ValueError(f"region {(x, y, width, height)}: x, y >= 0 and "
                                 "width, height >= 1")
        return regions

    def matches(self, ds: Dataset) -> bool:
        def same(expected: str | None, keyword: str) -> bool:
            return expected is None or \
                str(ds.get(keyword, "")).strip().upper() == expected.strip().upper()

        def equal(expected: int | None, keyword: str) -> bool:
            return expected is None or ds.get(keyword) == expected

        return (same(self.modality, "Modality") and same(self.manufacturer, "Manufacturer")
                and same(self.model, "ManufacturerModelName") and equal(self.rows, "Rows")
                and equal(self.columns, "Columns"))


class DeidOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    retain_modified_dates: bool = Field(
        False, description="Retain Longitudinal Temporal Information with Modified Dates "
                           "(113107): dates shifted by a keyed per-patient offset.")
    retain_patient_characteristics: bool = Field(
        False, description="Retain Patient Characteristics (113108): sex, age, size, "
                           "weight...")
    retain_device_identity: bool = Field(
        False, description="Retain Device Identity (113109): serial numbers, station "
                           "names...")
    retain_institution_identity: bool = Field(
        False, description="Retain Institution Identity (113112): institution name, address "
                           "and department, and the clinical trial site. Off by default: "
                           "a multicentre study that compares sites may choose it.")
    clean_descriptors: bool = Field(
        False, description="Clean Descriptors (113105): keep descriptions with every "
                           "identifier found in the instance scrubbed out.")
    retain_safe_private: bool = Field(
        False, description="Retain Safe Private (113111): keep the private attributes "
                           "listed in safe_private; every other private attribute goes.")
    safe_private: tuple[SafePrivate, ...] = ()
    clean_pixel_data: bool = Field(
        False, description="Clean Pixel Data (113101): blank the regions of pixel_masks in "
                           "every image a mask matches; images declaring burned-in "
                           "annotation that no mask matches stay excluded.")
    pixel_masks: tuple[PixelMask, ...] = ()
    text_detection: Literal["off", "text-prone", "all"] = Field(
        "text-prone", description="Look for burned-in text with OCR (Tesseract): on the "
                                  "image kinds that commonly carry it (secondary capture, "
                                  "ultrasound, screenshots, dose reports...), on every "
                                  "image, or not at all. Found text excludes the image, or "
                                  "is blanked under Clean Pixel Data.")
    allow_burned_in: bool = Field(
        False, description="Accept images declaring BurnedInAnnotation YES (the study "
                           "takes responsibility for text in the pixels).")

    def option_codes(self) -> list[str]:
        """The CID 7050 codes that apply, Basic Profile first."""
        codes = ["113100"]
        codes += [code for flag, code in (
            (self.clean_pixel_data, "113101"), (self.clean_descriptors, "113105"),
            (self.retain_modified_dates, "113107"),
            (self.retain_patient_characteristics, "113108"),
            (self.retain_device_identity, "113109"), (self.retain_safe_private, "113111"),
            (self.retain_institution_identity, "113112"),
        ) if flag]
        return codes

    def pixel_mask_for(self, ds: Dataset) -> PixelMask | None:
        """The first mask matching ``ds`` when Clean Pixel Data is chosen, else None."""
        if not self.clean_pixel_data:
            return None
        return next((mask for mask in self.pixel_masks if mask.matches(ds)), None)
