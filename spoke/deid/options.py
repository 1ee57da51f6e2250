"""What a study may choose on top of the Basic Application Level Confidentiality Profile.

Each flag is one PS3.15 Annex E option (its PS3.16 CID 7050 code in brackets); together
they decide the action table and the profile string recorded in custody records."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SafePrivate(BaseModel):
    """One private attribute the site has vetted as safe (PS3.15 E.3.10): the element
    ``(group, xxEE)`` of the block reserved by ``creator``."""

    model_config = ConfigDict(frozen=True)

    creator: str = Field(min_length=1, max_length=64)
    group: int = Field(ge=0x0009, le=0xFFFF, description="odd group number")
    element: int = Field(ge=0x00, le=0xFF, description="low byte of the element number")


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
    clean_descriptors: bool = Field(
        False, description="Clean Descriptors (113105): keep descriptions with every "
                           "identifier found in the instance scrubbed out.")
    retain_safe_private: bool = Field(
        False, description="Retain Safe Private (113111): keep the private attributes "
                           "listed in safe_private; every other private attribute goes.")
    safe_private: tuple[SafePrivate, ...] = ()
    allow_burned_in: bool = Field(
        False, description="Accept images declaring BurnedInAnnotation YES (the study "
                           "takes responsibility for text in the pixels).")

    def option_codes(self) -> list[str]:
        """The CID 7050 codes that apply, Basic Profile first."""
        codes = ["113100"]
        codes += [code for flag, code in (
            (self.clean_descriptors, "113105"), (self.retain_modified_dates, "113107"),
            (self.retain_patient_characteristics, "113108"),
            (self.retain_device_identity, "113109"), (self.retain_safe_private, "113111"),
        ) if flag]
        return codes
