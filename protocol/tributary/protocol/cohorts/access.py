"""Data access requests: the conditions a data access committee approved a request with,
and the grant a launch message carries so that a spoke's data steward sees which request,
approved under which conditions, a study runs under. The hub enforces the conditions before
anything is sent; the steward still decides for the site.

Self-contained (no import of :mod:`tributary.protocol.messages`, which imports this)."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

_SPOKE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
_REQUEST_ID = re.compile(r"^ar-[0-9a-f]{12}$")
#: A case attribute's name, as spokes' release policies and cohort criteria name them.
ATTRIBUTE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def _spoke(value: str) -> str:
    if not _SPOKE_ID.fullmatch(value):
        raise ValueError("spoke id must be 2-63 lower-case letters, digits or '-'")
    return value


def _attribute(value: str) -> str:
    if not ATTRIBUTE_RE.fullmatch(value):
        raise ValueError("an attribute name is 1-64 letters, digits, '_', '.' or '-', "
                         "starting with a letter")
    return value


def _request_id(value: str) -> str:
    if not _REQUEST_ID.fullmatch(value):
        raise ValueError("an access request id is 'ar-' and 12 hex digits")
    return value


SpokeId = Annotated[str, AfterValidator(_spoke)]
Attribute = Annotated[str, AfterValidator(_attribute)]
RequestId = Annotated[str, AfterValidator(_request_id)]


class StudyKind(StrEnum):
    """What a request may be used for: validation experiments, federated training, private
    set intersections (linking patients across sites) or vertical training on a linked
    cohort."""

    VALIDATION = "validation"
    TRAINING = "training"
    LINKAGE = "linkage"
    VERTICAL = "vertical"


class AccessConditions(BaseModel):
    """What the committee allowed. A launch bound to the request must stay inside every
    one: its spokes, the attributes it selects on or asks released, its kind, k at least
    ``min_k``, and (training) the ε it budgets within what is left of ``epsilon_budget``,
    before ``expires_at``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spokes: list[SpokeId] = Field(min_length=1, max_length=500)
    attributes: list[Attribute] = Field(default_factory=list, max_length=500)
    study_kinds: list[StudyKind] = Field(min_length=1, max_length=len(StudyKind))
    min_k: int = Field(5, ge=1, le=1_000_000)
    #: Total ε across every training study bound to the request (None: no training).
    epsilon_budget: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False)
    expires_at: datetime

    @model_validator(mode="after")
    def _training_needs_budget(self) -> AccessConditions:
        if StudyKind.TRAINING in self.study_kinds and self.epsilon_budget is None:
            raise ValueError("training is allowed only with an ε budget")
        if self.expires_at.tzinfo is None:
            raise ValueError("expires_at needs a time zone")
        return self


class AccessGrant(BaseModel):
    """The request a launch is bound to, as a launch message carries it (optional field,
    protocol 1.5 and later): its id, title and the committee's conditions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: RequestId
    title: str = Field(min_length=1, max_length=200)
    conditions: AccessConditions
    decided_at: datetime
