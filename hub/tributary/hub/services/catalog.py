"""The federated catalog at the hub: the latest signed description of each spoke, and the
facets a coordinator selects spokes by, with an estimated cohort size.

A description is accepted only from a registered, unrevoked spoke whose enrolled key
signed it (the envelope inside the message, kept as received for audit); anything else is
refused before it changes anything, and the results consumer dead-letters it like any
refused message. Every receipt is audited. The hub never learns more than the spoke
published: the estimate adds up published counts and bounds the withheld ones by the
published margins that contain them, never by guessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlmodel import Session, select

from tributary.hub.models import InboundMessage, Spoke, SpokeCatalogEntry, utcnow
from tributary.hub.schemas import CatalogRead, CatalogSpokeRead
from tributary.hub.services import audit
from tributary.hub.services.enrolment import active_keys
from tributary.protocol.cohorts.catalog import (
    CODE_RE,
    CatalogDescriptionMessage,
    SpokeDescription,
    open_description,
)
from tributary.protocol.messages import ProtocolError


class RefusedDescription(ProtocolError):
    """A description the hub will not keep (unknown or revoked spoke, bad signature...)."""


def ingest_description(session: Session, message: CatalogDescriptionMessage) -> bool:
    """Keep a spoke's (transport-verified) description if its own signature verifies;
    False if it is the one already kept. Raises :class:`RefusedDescription` before
    changing anything. The caller commits."""
    spoke = session.get(Spoke, message.spoke_id)
    if spoke is None:
        raise RefusedDescription(f"description from unregistered spoke {message.spoke_id!r}")
    if spoke.revoked_at is not None:
        raise RefusedDescription(f"description from revoked spoke {message.spoke_id!r}")
    keys = active_keys(session, message.spoke_id)
    if not keys:
        raise RefusedDescription(f"spoke {message.spoke_id!r} has no enrolled key")
    try:
        description = open_description(message, keys)
    except ValueError as exc:
        raise RefusedDescription(f"catalog description refused: {exc}") from None
    entry = session.get(SpokeCatalogEntry, message.spoke_id)
    # An older description overtaken on the way (sent again after an outage): keep the newer.
    stale = entry is not None and _aware(entry.generated_at) > _aware(description.generated_at)
    unchanged = entry is not None and entry.digest == message.digest
    session.add(InboundMessage(message_id=message.message_id, kind=message.kind,
                               spoke_id=message.spoke_id))
    spoke.last_seen_at = utcnow()
    session.add(spoke)
    if not stale:
        entry = entry or SpokeCatalogEntry(spoke_id=message.spoke_id, digest="",
                                           message_id="", generated_at=utcnow())
        entry.digest = message.digest
        entry.description = description.model_dump(mode="json")
        entry.envelope = message.envelope
        entry.message_id = message.message_id
        entry.generated_at = description.generated_at
        entry.received_at = utcnow()
        session.add(entry)
    audit.record(session, message.spoke_id, "catalog.received", message.spoke_id,
                 kind=message.kind, message_id=message.message_id, digest=message.digest,
                 unchanged=unchanged, stale=stale, cases=description.cases,
                 cells=len(description.cells))
    return not (stale or unchanged)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Facets:
    """What a coordinator selects spokes by. Codes are upper case (DICOM code strings)."""

    modality: str | None = None
    body_part: str | None = None
    attributes: tuple[str, ...] = field(default_factory=tuple)
    min_cases: int = 0

    @classmethod
    def parse(cls, modality: str | None, body_part: str | None, attributes: list[str],
              min_cases: int | None) -> Facets:
        """Facets from user input; ValueError (with why) for anything malformed."""
        def code(value: str | None, what: str) -> str | None:
            if value is None or not value.strip():
                return None
            value = value.strip().upper()
            if not CODE_RE.fullmatch(value):
                raise ValueError(f"{what} must be a DICOM code string (A-Z, 0-9, '_', space; "
                                 "at most 16 characters)")
            return value

        names = tuple(dict.fromkeys(a.strip() for a in attributes if a.strip()))
        if len(names) > 32 or any(len(a) > 64 for a in names):
            raise ValueError("at most 32 attributes of at most 64 characters")
        if min_cases is not None and not 0 <= min_cases <= 100_000_000:
            raise ValueError("min_cases must be between 0 and 100000000")
        return cls(code(modality, "modality"), code(body_part, "body part"), names,
                   min_cases or 0)

    def as_dict(self) -> dict[str, object]:
        return {"modality": self.modality, "body_part": self.body_part,
                "attributes": list(self.attributes), "min_cases": self.min_cases}


def bounds(description: SpokeDescription, facets: Facets) -> tuple[int | None, int]:
    """(published count, upper bound) of the cases matching the facets' modality and body
    part at one spoke. A count not published is at most the smallest published margin
    containing it, or the total; with the total withheld, fewer than k."""
    exact = description.cell(facets.modality, facets.body_part)
    if exact is not None:
        return exact, exact
    if description.cases is None:
        return None, description.terms.min_cell - 1
    containing = [description.cases]
    if facets.modality is not None and facets.body_part is not None:
        containing += [v for v in (description.cell(facets.modality, None),
                                   description.cell(None, facets.body_part)) if v is not None]
    return None, min(containing)


def judge(entry: SpokeCatalogEntry, spoke: Spoke, facets: Facets) -> CatalogSpokeRead:
    """One spoke under the facets."""
    description = SpokeDescription.model_validate(entry.description)
    exact, at_most = bounds(description, facets)
    missing = [a for a in facets.attributes if a not in description.attributes]
    if missing:
        match, why = "no", f"does not offer attribute(s) {', '.join(missing)}"
    elif exact is not None and exact >= facets.min_cases:
        match, why = "yes", f"{exact} matching cases published"
    elif exact is not None:
        match, why = "no", f"{exact} matching cases, fewer than {facets.min_cases}"
    elif at_most >= max(facets.min_cases, 1):
        match, why = "possible", (f"count withheld by the site's disclosure control (k = "
                                  f"{description.terms.min_cell}): between 0 and {at_most}")
    else:
        match, why = "no", f"at most {at_most} matching cases"
    return CatalogSpokeRead(
        spoke_id=entry.spoke_id, name=spoke.name, institution=spoke.institution,
        received_at=entry.received_at, generated_at=entry.generated_at, digest=entry.digest,
        match=match, cases=exact, cases_at_most=at_most, why=why,
        description=entry.description)


def catalog_entries(session: Session) -> list[tuple[SpokeCatalogEntry, Spoke]]:
    """Every kept description of a spoke that is not revoked, by spoke id."""
    rows = session.exec(select(SpokeCatalogEntry, Spoke)
                        .where(SpokeCatalogEntry.spoke_id == Spoke.id)
                        .order_by(SpokeCatalogEntry.spoke_id)).all()  # type: ignore[arg-type]
    return [(entry, spoke) for entry, spoke in rows if spoke.revoked_at is None]


def catalog_read(session: Session, facets: Facets) -> CatalogRead:
    """The catalog under ``facets``, with the estimated cohort size."""
    entries = catalog_entries(session)
    spokes = [judge(entry, spoke, facets) for entry, spoke in entries]
    matching = [s for s in spokes if s.match == "yes"]
    estimate = sum(s.cases or 0 for s in matching)
    more = sum(s.cases_at_most for s in spokes if s.match == "possible")
    text = f"{estimate} cases at {len(matching)} spoke(s)"
    if more:
        text += f"; up to {more} more where counts are withheld"
    descriptions = [SpokeDescription.model_validate(e.description) for e, _ in entries]
    return CatalogRead(
        facets=facets.as_dict(), spokes=spokes, matching=[s.spoke_id for s in matching],
        estimate=estimate, possible_more=more, estimate_text=text,
        modalities=sorted({m for d in descriptions for m in d.modalities()}),
        body_parts=sorted({b for d in descriptions for b in d.body_parts()}),
        attributes=sorted({a for d in descriptions for a in d.attributes}))
