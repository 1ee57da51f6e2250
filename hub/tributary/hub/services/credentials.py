"""Participant credentials at the hub: a spoke is a federation member only while the
membership credential it presented verifies (trusted authority, validity window, not
revoked, bound to the spoke and its signing keys). Checked when presented, at enrolment,
at every launch that targets the spoke, and periodically; each change of outcome is
audited. With no authority configured nothing is asked (the policy is None)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tributary.hub.models import SpokeCredential, SpokeKey, utcnow
from tributary.hub.services import audit
from tributary.hub.settings import HubSettings
from tributary.protocol.cohorts.credentials import (
    CredentialError,
    DidDocument,
    MembershipCredential,
    StatusListCredential,
    check_binding,
    check_status,
    verify_membership,
    verify_status_list,
)

log = logging.getLogger(__name__)

MISSING = "no membership credential was presented for this spoke"


@dataclass(frozen=True)
class Policy:
    """Which authorities and status lists the hub trusts; files are read at every check,
    so a new status list (a revocation) or DID document (a key rotation) counts at once."""

    authority_files: tuple[Path, ...]
    status_files: tuple[Path, ...]
    leeway: int
    federation: str

    def authorities(self) -> dict[str, DidDocument]:
        found: dict[str, DidDocument] = {}
        for path in self.authority_files:
            try:
                document = DidDocument.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                log.error("federation authority %s unreadable: %s", path, exc)
                continue
            found[document.id] = document
        return found

    def status_lists(self, authorities: dict[str, DidDocument], now: datetime
                     ) -> tuple[list[StatusListCredential], list[str]]:
        """The status lists that verify, and why the others do not."""
        lists, problems = [], []
        for path in self.status_files:
            try:
                lists.append(verify_status_list(path.read_text(), authorities, now,
                                                self.leeway))
            except OSError as exc:
                problems.append(f"{path.name}: unreadable ({exc.strerror})")
            except CredentialError as exc:
                problems.append(f"{path.name}: {exc}")
        return lists, problems


def policy(settings: HubSettings) -> Policy | None:
    """The hub's credential policy, or None when it trusts no federation authority."""
    if not settings.federation_authorities:
        return None
    return Policy(tuple(settings.federation_authorities),
                  tuple(settings.credential_status_lists), settings.credential_leeway_seconds,
                  settings.broker_federation)


def evaluate(policy: Policy, token: str, spoke_id: str, keyids: set[str],
             now: datetime | None = None) -> MembershipCredential:
    """The credential if it makes ``spoke_id`` (signing with ``keyids``) a member now,
    else :class:`CredentialError` with the reason."""
    now = now or datetime.now(UTC)
    authorities = policy.authorities()
    if not authorities:
        raise CredentialError("none of the configured federation authorities is readable")
    credential = verify_membership(token, authorities, now, policy.leeway)
    check_binding(credential, spoke_id, keyids, policy.federation)
    lists, problems = policy.status_lists(authorities, now)
    try:
        check_status(credential, lists)
    except CredentialError as exc:
        if problems and "not available" in str(exc):
            raise CredentialError(f"{exc} ({'; '.join(problems)})") from None
        raise
    return credential


def policy_problem(policy: Policy, now: datetime | None = None) -> str | None:
    """Why the hub can check no credential now (its own configuration or the authority's
    publication, not any spoke), or None: every credential is refused then, but that is
    no spoke's lapse (services/lapse.py withdraws nobody for it)."""
    now = now or datetime.now(UTC)
    authorities = policy.authorities()
    if not authorities:
        return "none of the configured federation authorities is readable"
    lists, problems = policy.status_lists(authorities, now)
    if not lists:
        return f"no configured status list verifies ({'; '.join(problems) or 'none configured'})"
    return None


def _active_keyids(session: Session, spoke_id: str) -> set[str]:
    return {k.keyid for k in session.exec(select(SpokeKey).where(
        SpokeKey.spoke_id == spoke_id, SpokeKey.revoked_at == None))}  # noqa: E711


def present(session: Session, policy: Policy, spoke_id: str, token: str, actor: str,
            new_keyid: str | None = None) -> SpokeCredential:
    """Verify and store the credential a spoke presents (replacing its previous one); it
    must name every active key of the spoke and ``new_keyid`` (a key being enrolled). A
    refusal is audited (the caller commits) and raised as :class:`CredentialError`."""
    keyids = _active_keyids(session, spoke_id) | ({new_keyid} if new_keyid else set())
    try:
        credential = evaluate(policy, token, spoke_id, keyids)
    except CredentialError as exc:
        audit.record(session, actor, "credential.refused", spoke_id, reason=str(exc),
                     at="presentation")
        raise
    row = session.get(SpokeCredential, spoke_id) or SpokeCredential(
        spoke_id=spoke_id, token="", credential_id="", issuer="", subject="",
        valid_from=utcnow(), valid_until=utcnow(), status_list="", status_index=0,
        presented_by=actor)
    row.token, row.credential_id = token.strip(), credential.id
    row.issuer, row.subject = credential.issuer, credential.credentialSubject.id
    row.keyids = list(credential.credentialSubject.keyids)
    row.valid_from, row.valid_until = credential.validFrom, credential.validUntil
    row.status_list = credential.credentialStatus.statusListCredential
    row.status_index = credential.credentialStatus.index
    row.presented_at = row.checked_at = utcnow()
    row.presented_by, row.state, row.reason = actor, "valid", ""
    session.add(row)
    audit.record(session, actor, "credential.presented", spoke_id,
                 credential=credential.id, issuer=credential.issuer,
                 subject=credential.credentialSubject.id, keyids=row.keyids,
                 valid_until=credential.validUntil.isoformat())
    return row


def check(session: Session, policy: Policy, spoke_id: str, actor: str = "hub",
          now: datetime | None = None) -> str | None:
    """Check the spoke's stored credential again: None if it is a member, else the reason.
    The outcome is stored and, when it changed, audited (the caller commits)."""
    row = session.get(SpokeCredential, spoke_id)
    if row is None:
        return MISSING
    try:
        evaluate(policy, row.token, spoke_id, _active_keyids(session, spoke_id), now)
        state, reason = "valid", ""
    except CredentialError as exc:
        state, reason = "refused", str(exc)
    if (state, reason) != (row.state, row.reason):
        audit.record(session, actor, f"credential.{state}", spoke_id,
                     credential=row.credential_id, reason=reason, previously=row.state)
    row.state, row.reason, row.checked_at = state, reason, utcnow()
    session.add(row)
    return reason or None


def refuse_non_members(session: Session, settings: HubSettings, spoke_ids: list[str],
                       actor: str, action: str, target: str) -> list[dict[str, str]]:
    """The spokes among ``spoke_ids`` that are not members now, each with its reason; when
    there are any, the refusal is audited as ``action`` and committed (nothing else is)."""
    listed = [{"spoke_id": s, "reason": r}
              for s, r in sorted(refusals(session, policy(settings),
                                          sorted(set(spoke_ids))).items())]
    if listed:
        audit.record(session, actor, action, target, refusals=listed)
        session.commit()
    return listed


def refusals(session: Session, policy: Policy | None, spoke_ids: list[str]
             ) -> dict[str, str]:
    """Why each of ``spoke_ids`` may not be targeted (empty: all may, or no policy)."""
    if policy is None:
        return {}
    found = {}
    for spoke_id in spoke_ids:
        reason = check(session, policy, spoke_id)
        if reason is not None:
            found[spoke_id] = f"membership credential refused: {reason}"
    return found


def member_refusal(session: Session, spoke_id: str) -> str | None:
    """Why ``spoke_id`` is no member now, from its stored credential's last check (cheap:
    one row, no files read), or None. A spoke with no stored credential is not refused
    here: a hub without an authority asks for none, one with an authority refuses it at
    launch. What refuses a lapsed spoke's training, vertical and PSI messages."""
    row = session.get(SpokeCredential, spoke_id)
    if row is None or row.state != "refused":
        return None
    return f"membership credential refused: {row.reason}"


def check_all(engine: Engine, policy: Policy) -> None:
    """One periodic pass over every stored credential."""
    with Session(engine) as session:
        for spoke_id in session.exec(select(SpokeCredential.spoke_id)).all():
            check(session, policy, spoke_id)
        session.commit()


class Watch:
    """The hub process's periodic re-check of stored credentials (expiry, revocation), so
    the dashboard and audit trail show a lapse before anyone tries to launch; ``after_pass``
    acts on what a pass found (services/lapse.py withdraws lapsed spokes from studies)."""

    def __init__(self, engine: Engine, policy: Policy, interval: float,
                 after_pass: Callable[[], None] | None = None) -> None:
        self.engine, self.policy, self.interval = engine, policy, interval
        self.after_pass = after_pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="credential-watch",
                                        daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                check_all(self.engine, self.policy)
                if self.after_pass is not None:
                    self.after_pass()
            except Exception:  # a bad pass must not end the watch
                log.exception("credential check failed")
            self._stop.wait(self.interval)

    def start(self) -> Watch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def start(settings: HubSettings, engine: Engine,
          after_pass: Callable[[], None] | None = None) -> Watch | None:
    found = policy(settings)
    if found is None:
        return None
    return Watch(engine, found, settings.credential_check_seconds, after_pass).start()
