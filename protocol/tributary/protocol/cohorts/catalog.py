"""The federated catalog on the wire: what a spoke tells the hub about the data it holds,
so a coordinator can find the sites a study needs before anything is asked of them.

A spoke describes its de-identified catalog in a :class:`SpokeDescription`: case, study
and series totals, cases by modality, by body part and by both (only the cells its
disclosure control lets out: a count below the site's ``k`` and the counts that would give
it away are left out, never sent as "suppressed", so an absent cell may be zero), the
years its cases were catalogued (only years at least ``k`` cases support), its
de-identification profile and options, its data-release policy and the NAMES of the
releasable attributes present on at least ``k`` cases. Never a value, a pseudonym or a
non-releasable attribute name. The spoke signs the description with its enrolled key (a
DSSE envelope, re-verifiable by anyone holding that key) and sends it in a
:class:`CatalogDescriptionMessage` through its durable outbox.

This module imports nothing from :mod:`tributary.protocol.messages` (which registers the
message kind in its unions), so it carries its own copies of the id rules."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tributary.protocol import PROTOCOL_VERSION
from tributary.protocol.canonical import canonical_json, sha256_hex
from tributary.protocol.signing import PublicKey, SigningKey, verify

#: The DSSE payload type of a signed description.
DESCRIPTION_PAYLOAD_TYPE = "application/vnd.tributary.catalog-description+json"
#: Bounds: a description stays far below the broker's message limit whatever the site holds.
MAX_CELLS = 2048
MAX_ATTRIBUTES = 256
#: A DICOM Code String (Modality, BodyPartExamined): upper case, digits, space, underscore,
#: at most 16 characters. Anything else a device wrote is described as ``OTHER``.
CODE_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")
#: A body part the series did not state.
UNSPECIFIED = "UNSPECIFIED"
OTHER = "OTHER"
ATTRIBUTE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: The parts of a description that are counts (a change to only these waits until the
#: site's total moved by at least k: see tributary.spoke.catalog_publisher).
COUNT_FIELDS = frozenset({"cases", "studies", "series", "cells", "years"})
_SPOKE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_PROFILE_RE = re.compile(r"^[\x20-\x7e]{1,300}$")


def _spoke(value: str) -> str:
    if not _SPOKE_RE.fullmatch(value):
        raise ValueError("spoke id must be 2-63 lower-case letters, digits or '-'")
    return value


def _id(value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ValueError("an id is 1-128 ASCII letters, digits, '.', '_' or '-'")
    return value


def _code(value: str) -> str:
    if not CODE_RE.fullmatch(value):
        raise ValueError("a modality or body part is a DICOM code string: A-Z, 0-9, '_' or "
                         "space, at most 16 characters")
    return value


def _attribute(value: str) -> str:
    if not ATTRIBUTE_RE.fullmatch(value):
        raise ValueError("an attribute name is 1-64 ASCII letters, digits, '_', '.' or '-'")
    return value


SpokeId = Annotated[str, AfterValidator(_spoke)]
Code = Annotated[str, AfterValidator(_code)]
AttributeName = Annotated[str, AfterValidator(_attribute)]


def code_of(value: str | None) -> str:
    """The code a catalog value is described under: its DICOM code string, ``UNSPECIFIED``
    when there is none, ``OTHER`` when what the device wrote is not a code string."""
    if value is None or not value.strip():
        return UNSPECIFIED
    value = value.strip().upper()
    return value if CODE_RE.fullmatch(value) else OTHER


class CountCell(BaseModel):
    """Cases with at least one series of ``modality`` and ``body_part``; ``None`` on one
    side makes it a margin (cases with a series of that modality, of any body part)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: Code | None = None
    body_part: Code | None = None
    cases: int = Field(ge=0, le=100_000_000)

    @model_validator(mode="after")
    def _not_total(self) -> CountCell:
        if self.modality is None and self.body_part is None:
            raise ValueError("a cell names a modality, a body part or both (the total is "
                             "SpokeDescription.cases)")
        return self


class YearRange(BaseModel):
    """Years the site's cases were catalogued, generalised: ``first`` is the year by which
    at least k cases had been catalogued, ``last`` the year of the k-th most recent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first: int = Field(ge=1900, le=2999)
    last: int = Field(ge=1900, le=2999)

    @model_validator(mode="after")
    def _ordered(self) -> YearRange:
        if self.first > self.last:
            raise ValueError("first year after last year")
        return self


class ReleaseTerms(BaseModel):
    """The parts of the site's policy a coordinator plans a study around."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_cell: int = Field(ge=1, le=1000, description="k: smaller counts never leave.")
    counts_enabled: bool
    steward_approves_experiments: bool
    steward_reviews_results: bool
    log_tails: bool
    max_output_bytes: int = Field(ge=0)
    training: bool


class SpokeDescription(BaseModel):
    """What one spoke holds, as much as its policy lets out. ``None`` for a total means
    suppressed: fewer than ``k`` cases in all, and then no cell is listed either."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spoke_id: SpokeId
    generated_at: datetime
    cases: int | None = Field(None, ge=0)
    studies: int | None = Field(None, ge=0)
    series: int | None = Field(None, ge=0)
    cells: list[CountCell] = Field(default_factory=list, max_length=MAX_CELLS)
    years: YearRange | None = None
    deid_profile: str | None = Field(None, max_length=300)
    deid_options: list[str] = Field(default_factory=list, max_length=32)
    terms: ReleaseTerms
    attributes: list[AttributeName] = Field(default_factory=list, max_length=MAX_ATTRIBUTES)

    @field_validator("deid_profile")
    @classmethod
    def _profile(cls, value: str | None) -> str | None:
        if value is not None and not _PROFILE_RE.fullmatch(value):
            raise ValueError("deid_profile holds unexpected characters")
        return value

    @field_validator("deid_options")
    @classmethod
    def _options(cls, value: list[str]) -> list[str]:
        for code in value:
            if not re.fullmatch(r"[0-9]{6}", code):
                raise ValueError(f"not a CID 7050 code: {code[:20]!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SpokeDescription:
        if self.cases is None and (self.cells or self.years or self.studies is not None
                                   or self.series is not None):
            raise ValueError("a description whose total is suppressed lists no counts")
        keys = [(c.modality, c.body_part) for c in self.cells]
        if len(keys) != len(set(keys)):
            raise ValueError("a cell is listed twice")
        for cell in self.cells:
            if cell.cases < self.terms.min_cell:
                raise ValueError("a listed cell is below the description's own k")
        if self.cases is not None and self.cases < self.terms.min_cell:
            raise ValueError("a published total is below the description's own k")
        return self

    def content(self) -> dict[str, Any]:
        """Everything but when it was made: what the digest covers."""
        return self.model_dump(mode="json", exclude={"generated_at"})

    def digest(self) -> str:
        """``sha256:`` of the canonical content: equal digests, equal descriptions."""
        return "sha256:" + sha256_hex(canonical_json(self.content()))

    def cell(self, modality: str | None, body_part: str | None) -> int | None:
        """The published count of a cell or margin (both None: the total), or None."""
        if modality is None and body_part is None:
            return self.cases
        for cell in self.cells:
            if cell.modality == modality and cell.body_part == body_part:
                return cell.cases
        return None

    def modalities(self) -> list[str]:
        return sorted({c.modality for c in self.cells if c.modality is not None})

    def body_parts(self) -> list[str]:
        return sorted({c.body_part for c in self.cells if c.body_part is not None})


def parse_description(payload: bytes) -> SpokeDescription:
    """A description from a verified envelope's payload; ValueError if malformed."""
    try:
        return SpokeDescription.model_validate(json.loads(payload))
    except (ValueError, ValidationError, RecursionError) as exc:
        raise ValueError(f"malformed catalog description: {str(exc)[:300]}") from None


class _Signature(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    keyid: str = Field(max_length=256)
    sig: str = Field(max_length=1024)


class SignedEnvelope(BaseModel):
    """The shape of the DSSE envelope a description travels in, checked before any
    signature code sees it (that code assumes well-typed fields)."""

    model_config = ConfigDict(extra="allow", strict=True)

    payload: str = Field(max_length=1_500_000)
    payloadType: str = Field(max_length=256)  # the DSSE field name
    signatures: list[_Signature] = Field(min_length=1, max_length=8)


class CatalogDescriptionMessage(BaseModel):
    """Spoke → hub: the spoke's current description, signed (``envelope``: a DSSE envelope
    of :data:`DESCRIPTION_PAYLOAD_TYPE` by the spoke's enrolled key, which the hub keeps
    for audit) and its ``digest``. Sent at start and whenever the description changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["catalog_description"] = "catalog_description"
    protocol_version: str = PROTOCOL_VERSION
    message_id: Annotated[str, AfterValidator(_id)] = Field(
        default_factory=lambda: uuid.uuid4().hex)
    sent_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    spoke_id: SpokeId
    digest: str
    envelope: dict[str, Any]

    @field_validator("protocol_version")
    @classmethod
    def _major(cls, value: str) -> str:
        if value.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
            raise ValueError(f"unsupported protocol version {value!r}; this side speaks "
                             f"{PROTOCOL_VERSION}")
        return value

    @field_validator("digest")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not _DIGEST_RE.fullmatch(value):
            raise ValueError("digest must be 'sha256:' and 64 lower-case hex digits")
        return value

    @field_validator("envelope")
    @classmethod
    def _envelope(cls, value: dict[str, Any]) -> dict[str, Any]:
        SignedEnvelope.model_validate(value)
        return value


def sign_description(description: SpokeDescription,
                     key: SigningKey) -> CatalogDescriptionMessage:
    """The message carrying ``description`` signed by the spoke's ``key``."""
    envelope = key.sign(canonical_json(description.model_dump(mode="json")),
                        DESCRIPTION_PAYLOAD_TYPE)
    return CatalogDescriptionMessage(spoke_id=description.spoke_id,
                                     digest=description.digest(), envelope=envelope)


def open_description(message: CatalogDescriptionMessage,
                     keys: list[PublicKey]) -> SpokeDescription:
    """The description a message carries, once its envelope verifies with one of the
    spoke's ``keys``, it names the message's spoke and matches its digest. Raises
    ``ValueError`` (a :class:`~tributary.protocol.signing.SignatureError` for a bad
    signature)."""
    description = parse_description(verify(message.envelope, keys, DESCRIPTION_PAYLOAD_TYPE))
    if description.spoke_id != message.spoke_id:
        raise ValueError(f"description of spoke {description.spoke_id!r} sent by "
                         f"{message.spoke_id!r}")
    if description.digest() != message.digest:
        raise ValueError("the description does not match the message's digest")
    return description
