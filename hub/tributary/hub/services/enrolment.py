"""Spoke keys: enrolment (an allowlist of public keys), rotation and revocation."""

from __future__ import annotations

from functools import lru_cache

from sqlmodel import Session, select

from tributary.hub.models import SpokeKey, utcnow
from tributary.hub.services import audit
from tributary.protocol.signing import PublicKey


@lru_cache(maxsize=4096)
def public_key(pem: str) -> PublicKey:
    """An enrolled key's PEM, parsed once (parsing costs more than checking a signature)."""
    return PublicKey.from_pem(pem)


def active_keys(session: Session, spoke_id: str) -> list[PublicKey]:
    rows = session.exec(select(SpokeKey).where(SpokeKey.spoke_id == spoke_id,
                                               SpokeKey.revoked_at == None)).all()  # noqa: E711
    return [public_key(r.public_key_pem) for r in rows]


def keys_by_spoke(session: Session) -> dict[str, list[SpokeKey]]:
    """Every key ever enrolled, revoked or not, by spoke."""
    keys: dict[str, list[SpokeKey]] = {}
    for key in session.exec(select(SpokeKey)):
        keys.setdefault(key.spoke_id, []).append(key)
    return keys


def enrolled_spokes(session: Session) -> set[str]:
    """The spokes with at least one active key: those whose messages are accepted."""
    return {k.spoke_id for k in session.exec(select(SpokeKey).where(
        SpokeKey.revoked_at == None))}  # noqa: E711


def resolve_key(session: Session, keyid: str) -> tuple[str, PublicKey] | None:
    """Owner and key for an active key id; None for unknown or revoked keys."""
    row = session.get(SpokeKey, keyid)
    if row is None or row.revoked_at is not None:
        return None
    return row.spoke_id, public_key(row.public_key_pem)


def enrol(session: Session, spoke_id: str, public_key_pem: str, actor: str) -> SpokeKey:
    key = PublicKey.from_pem(public_key_pem)
    existing = session.get(SpokeKey, key.keyid)
    if existing is not None:
        if existing.spoke_id != spoke_id:
            raise ValueError("this key is enrolled for another spoke")
        if existing.revoked_at is not None:
            raise ValueError("this key was revoked and cannot be enrolled again")
        return existing
    row = SpokeKey(keyid=key.keyid, spoke_id=spoke_id, public_key_pem=key.pem)
    session.add(row)
    audit.record(session, actor, "key.enrolled", spoke_id, keyid=key.keyid)
    session.commit()
    session.refresh(row)
    return row


def revoke(session: Session, spoke_id: str, keyid: str, actor: str) -> SpokeKey:
    row = session.get(SpokeKey, keyid)
    if row is None or row.spoke_id != spoke_id:
        raise LookupError(f"spoke {spoke_id} has no key {keyid}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        audit.record(session, actor, "key.revoked", spoke_id, keyid=keyid)
        session.commit()
        session.refresh(row)
    return row
