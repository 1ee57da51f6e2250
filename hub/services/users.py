"""Users, hashed passwords (scrypt) and bearer tokens (stored as SHA-256 only)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta

from sqlmodel import Session

from tributary.hub.models import ApiToken, Organisation, Role, User, utcnow
from tributary.hub.services import audit, organisations

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _scheme, n, r, p, salt, digest = stored.split("$")
        computed = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n),
                                  r=int(r), p=int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(computed.hex(), digest)


def create_user(session: Session, username: str, password: str, roles: list[str],
                organisation: str = "", actor: str = "system",
                organisation_id: int | None = None) -> User:
    """A new user, in the organisation ``organisation_id`` or named ``organisation`` (the
    existing record of that normalised name, else a new one; see services.organisations)."""
    if len(password) < 12:
        raise ValueError("passwords must have at least 12 characters")
    unknown = set(roles) - {r.value for r in Role}
    if unknown:
        raise ValueError(f"unknown roles: {sorted(unknown)}")
    if session.get(User, username) is not None:
        raise ValueError(f"user {username!r} exists")
    member_of = organisations.resolve(session, actor, organisation_id, organisation)
    user = User(username=username, organisation_id=member_of.id if member_of else None,
                roles=sorted(set(roles)), password_hash=hash_password(password))
    session.add(user)
    audit.record(session, actor, "user.created", username, roles=user.roles,
                 organisation=member_of.name if member_of else "",
                 organisation_id=user.organisation_id)
    session.commit()
    session.refresh(user)
    return user


def organisation_of(session: Session, user: User) -> Organisation | None:
    return session.get(Organisation, user.organisation_id) if user.organisation_id else None


def issue_token(session: Session, username: str, password: str,
                lifetime: timedelta = timedelta(hours=12)) -> tuple[str, datetime] | None:
    user = session.get(User, username)
    if user is None or user.disabled or not check_password(password, user.password_hash):
        audit.record(session, username, "auth.failed", username)
        session.commit()
        return None
    token = secrets.token_urlsafe(32)
    expires = utcnow() + lifetime
    session.add(ApiToken(token_sha256=hashlib.sha256(token.encode()).hexdigest(),
                         username=username, expires_at=expires))
    audit.record(session, username, "auth.token_issued", username)
    session.commit()
    return token, expires


def user_for_token(session: Session, token: str) -> User | None:
    row = session.get(ApiToken, hashlib.sha256(token.encode()).hexdigest())
    if row is None:
        return None
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)
    if expires < datetime.now(UTC):
        return None
    user = session.get(User, row.username)
    return None if user is None or user.disabled else user
