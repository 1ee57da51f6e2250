"""Users, hashed passwords (scrypt) and bearer tokens (stored as SHA-256 only)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime, timedelta

from sqlmodel import Session, select

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


#: Checked against when the user is unknown or disabled, so that every sign-in costs one
#: scrypt and the response time does not tell which usernames exist.
_DECOY_HASH = hash_password(secrets.token_urlsafe(16))


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The enabled user with this password, else None; always one scrypt (no timing hint)."""
    user = session.get(User, username)
    usable = user is not None and not user.disabled
    matches = check_password(password, user.password_hash if user is not None
                             else _DECOY_HASH)
    return user if usable and matches else None


def issue_token(session: Session, username: str, password: str,
                lifetime: timedelta = timedelta(hours=12)) -> tuple[str, datetime] | None:
    user = session.get(User, username)
    usable = user is not None and not user.disabled
    matches = check_password(password, user.password_hash if user is not None
                             else _DECOY_HASH)
    if not (usable and matches):
        audit.record(session, username, "auth.failed", username)
        session.commit()
        return None
    token = secrets.token_urlsafe(32)
    expires = utcnow() + lifetime
    session.add(ApiToken(token_sha256=_digest(token), username=username, expires_at=expires))
    audit.record(session, username, "auth.token_issued", username)
    session.commit()
    return token, expires


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def revoke_token(session: Session, token: str, actor: str | None = None) -> bool:
    """Sign out: the token is deleted, so it is refused from now on."""
    row = session.get(ApiToken, _digest(token))
    if row is None:
        return False
    session.delete(row)
    audit.record(session, actor or row.username, "auth.token_revoked", row.username)
    session.commit()
    return True


def revoke_tokens(session: Session, username: str, actor: str) -> int:
    """Every token of ``username`` revoked (a lost laptop, a leaving member); returns how many."""
    rows = session.exec(select(ApiToken).where(ApiToken.username == username)).all()
    for row in rows:
        session.delete(row)
    audit.record(session, actor, "auth.tokens_revoked", username, count=len(rows))
    session.commit()
    return len(rows)


def set_disabled(session: Session, user: User, disabled: bool, actor: str) -> User:
    """Disable (all tokens revoked, no new sign-in) or enable a user."""
    user.disabled = disabled
    session.add(user)
    if disabled:
        for row in session.exec(select(ApiToken).where(ApiToken.username == user.username)):
            session.delete(row)
    audit.record(session, actor, "user.disabled" if disabled else "user.enabled",
                 user.username)
    session.commit()
    session.refresh(user)
    return user


def user_for_token(session: Session, token: str) -> User | None:
    row = session.get(ApiToken, _digest(token))
    if row is None:
        return None
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)
    if expires < datetime.now(UTC):
        return None
    user = session.get(User, row.username)
    return None if user is None or user.disabled else user
