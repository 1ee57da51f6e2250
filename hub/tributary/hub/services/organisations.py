"""Organisations as records. The review rule compares organisations by identity, so a name
is normalised once, here, and two spellings of one name ("North", "north ") can never
become two organisations."""

from __future__ import annotations

import unicodedata

from sqlmodel import Session, select

from tributary.hub.models import Organisation
from tributary.hub.services import audit


class OrganisationError(ValueError):
    pass


def display_name(name: str) -> str:
    """The name as shown: Unicode NFKC, surrounding and repeated whitespace removed."""
    return " ".join(unicodedata.normalize("NFKC", name).split())


def name_key(name: str) -> str:
    """What makes two names the same organisation: the display name, case-folded."""
    return display_name(name).casefold()


def find(session: Session, name: str) -> Organisation | None:
    return session.exec(select(Organisation).where(
        Organisation.name_key == name_key(name))).first()


def create(session: Session, name: str, actor: str) -> Organisation:
    """A new organisation; refused when the name is empty or one like it exists."""
    shown = display_name(name)
    if not shown:
        raise OrganisationError("an organisation needs a name")
    if len(shown) > 200:
        raise OrganisationError("organisation names have at most 200 characters")
    existing = find(session, shown)
    if existing is not None:
        raise OrganisationError(f"organisation {existing.name!r} (id {existing.id}) exists")
    organisation = Organisation(name=shown, name_key=name_key(shown))
    session.add(organisation)
    session.flush()
    audit.record(session, actor, "organisation.created", shown, id=organisation.id)
    return organisation


def resolve(session: Session, actor: str, organisation_id: int | None = None,
            name: str = "") -> Organisation | None:
    """The organisation a new user joins: by id (which must exist), or by name (the
    existing record of that normalised name, else a new one created by ``actor``)."""
    if organisation_id is not None:
        found = session.get(Organisation, organisation_id)
        if found is None:
            raise OrganisationError(f"no organisation with id {organisation_id}")
        if name and name_key(name) != found.name_key:
            raise OrganisationError(f"organisation {organisation_id} is {found.name!r}, "
                                    f"not {name!r}")
        return found
    if not display_name(name):
        return None
    return find(session, name) or create(session, name, actor)
