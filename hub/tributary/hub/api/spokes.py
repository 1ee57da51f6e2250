"""Spoke registration."""

from fastapi import APIRouter, Depends, HTTPException, Request
from sqlmodel import Session, select

from tributary.hub.deps import (
    acting,
    current_user,
    get_broker,
    get_or_404,
    get_session,
    get_settings,
)
from tributary.hub.models import CustodyGap, Role, Spoke, SpokeCredential, SpokeKey
from tributary.hub.schemas import (
    CredentialPresent,
    GapAccept,
    KeyEnrol,
    SpokeCreate,
    SpokeCredentialRead,
    SpokeRead,
    SpokeRevoke,
)
from tributary.hub.services import audit, credentials, enrolment, gaps, ingest
from tributary.hub.services.spokes import revoke_spoke, spoke_read, spoke_reads
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import PublishError, StompClient
from tributary.protocol.cohorts.credentials import CredentialError
from tributary.protocol.signing import PublicKey, SignatureError

router = APIRouter(prefix="/api/spokes", tags=["spokes"], dependencies=[Depends(current_user)])


@router.post("", status_code=201, response_model=Spoke)
def register_spoke(body: SpokeCreate, session: Session = Depends(get_session),
                   actor: str = Depends(acting(Role.ADMIN))) -> Spoke:
    if session.get(Spoke, body.id) is not None:
        raise HTTPException(409, f"spoke {body.id!r} is already registered")
    spoke = Spoke(id=body.id, name=body.name, institution=body.institution,
                  sandbox=body.sandbox)
    session.add(spoke)
    audit.record(session, actor, "spoke.registered", body.id, name=body.name,
                 sandbox=body.sandbox)
    session.commit()
    session.refresh(spoke)
    return spoke


@router.get("", response_model=list[SpokeRead])
def list_spokes(session: Session = Depends(get_session),
                settings: HubSettings = Depends(get_settings)) -> list[SpokeRead]:
    """Every spoke with its liveness: online when heard from within the configured window,
    and what its latest heartbeat reported (version, capacity, queue, running cases)."""
    return spoke_reads(session, settings.spoke_online_seconds)


@router.get("/{spoke_id}", response_model=SpokeRead)
def get_spoke(spoke_id: str, session: Session = Depends(get_session),
              settings: HubSettings = Depends(get_settings)) -> SpokeRead:
    return spoke_read(_spoke(session, spoke_id), settings.spoke_online_seconds)


def _spoke(session: Session, spoke_id: str) -> Spoke:
    return get_or_404(session, Spoke, spoke_id, "spoke")


@router.post("/{spoke_id}/keys", status_code=201, response_model=SpokeKey)
def enrol_key(spoke_id: str, body: KeyEnrol, session: Session = Depends(get_session),
              settings: HubSettings = Depends(get_settings),
              actor: str = Depends(acting(Role.ADMIN))) -> SpokeKey:
    """Enrol a public key the spoke generated locally; its messages are accepted from now.
    When the hub trusts a federation authority, only under a membership credential that
    verifies and names the key (422 with the reason otherwise)."""
    if _spoke(session, spoke_id).revoked_at is not None:
        raise HTTPException(409, f"spoke {spoke_id!r} was revoked; register the site again "
                                 "under a new id")
    try:
        _membership_at_enrolment(session, settings, spoke_id, body, actor)
        return enrolment.enrol(session, spoke_id, body.public_key_pem, actor)
    except CredentialError as exc:
        raise HTTPException(422, f"credential refused: {exc}") from None
    except (SignatureError, ValueError) as exc:
        raise HTTPException(422, str(exc)) from None


def _membership_at_enrolment(session: Session, settings: HubSettings, spoke_id: str,
                             body: KeyEnrol, actor: str) -> None:
    """When the hub trusts a federation authority, a key is enrolled only under a
    membership credential that verifies and names it: the one sent with the key, else the
    one the spoke presented before. A refusal is audited and answered 422 with its reason."""
    membership = credentials.policy(settings)
    if membership is None:
        return
    keyid = PublicKey.from_pem(body.public_key_pem).keyid
    token = body.credential
    if token is None:
        stored = session.get(SpokeCredential, spoke_id)
        if stored is None:
            audit.record(session, actor, "credential.refused", spoke_id,
                         reason=credentials.MISSING, at="enrolment", keyid=keyid)
            session.commit()
            raise CredentialError(f"{credentials.MISSING}; send it with the key "
                                  f"(`credential`), as issued by a federation authority")
        token = stored.token
    try:
        credentials.present(session, membership, spoke_id, token, actor, new_keyid=keyid)
    except CredentialError:
        session.commit()  # the refusal's audit event
        raise


@router.put("/{spoke_id}/credential", response_model=SpokeCredentialRead)
def present_credential(spoke_id: str, body: CredentialPresent,
                       session: Session = Depends(get_session),
                       settings: HubSettings = Depends(get_settings),
                       actor: str = Depends(acting(Role.ADMIN))) -> SpokeCredentialRead:
    """Present (or renew) the spoke's membership credential: verified now (422 with the
    reason if refused, audited), then checked again periodically and at every launch."""
    _spoke(session, spoke_id)
    membership = credentials.policy(settings)
    if membership is None:
        raise HTTPException(409, "this hub trusts no federation authority "
                                 "(TRIBUTARY_HUB_FEDERATION_AUTHORITIES)")
    try:
        credentials.present(session, membership, spoke_id, body.credential, actor)
    except CredentialError as exc:
        session.commit()
        raise HTTPException(422, f"credential refused: {exc}") from None
    session.commit()
    return _credential_read(session, settings, spoke_id)


@router.get("/{spoke_id}/credential", response_model=SpokeCredentialRead)
def get_credential(spoke_id: str, session: Session = Depends(get_session),
                   settings: HubSettings = Depends(get_settings)) -> SpokeCredentialRead:
    """The spoke's credential, checked now (expiry, revocation, binding to its keys)."""
    _spoke(session, spoke_id)
    membership = credentials.policy(settings)
    if membership is not None:
        credentials.check(session, membership, spoke_id)
        session.commit()
    return _credential_read(session, settings, spoke_id)


def _credential_read(session: Session, settings: HubSettings,
                     spoke_id: str) -> SpokeCredentialRead:
    required = credentials.policy(settings) is not None
    row = session.get(SpokeCredential, spoke_id)
    if row is None:
        return SpokeCredentialRead(spoke_id=spoke_id, required=required, present=False,
                                   state="missing" if required else "",
                                   reason=credentials.MISSING if required else "")
    return SpokeCredentialRead(required=required, present=True,
                               **row.model_dump(exclude={"token"}))


@router.get("/{spoke_id}/keys", response_model=list[SpokeKey])
def list_keys(spoke_id: str, session: Session = Depends(get_session)) -> list[SpokeKey]:
    _spoke(session, spoke_id)
    return list(session.exec(select(SpokeKey).where(SpokeKey.spoke_id == spoke_id)))


@router.post("/{spoke_id}/keys/{keyid}/revoke", response_model=SpokeKey)
def revoke_key(spoke_id: str, keyid: str, session: Session = Depends(get_session),
               actor: str = Depends(acting(Role.ADMIN))) -> SpokeKey:
    """Revoke a key: anything it signs from now on is refused."""
    try:
        return enrolment.revoke(session, spoke_id, keyid, actor)
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from None


@router.post("/{spoke_id}/revoke", response_model=SpokeRead)
def revoke(spoke_id: str, body: SpokeRevoke, session: Session = Depends(get_session),
           settings: HubSettings = Depends(get_settings),
           actor: str = Depends(acting(Role.ADMIN))) -> SpokeRead:
    """Revoke a spoke: its keys, its results from now on, its registry tokens. Run
    ``tributary pki revoke`` to withdraw its broker and object-store identities as well."""
    spoke = revoke_spoke(session, _spoke(session, spoke_id), actor, body.reason)
    return spoke_read(spoke, settings.spoke_online_seconds)


@router.get("/{spoke_id}/custody-gaps", response_model=list[CustodyGap])
def list_custody_gaps(spoke_id: str, session: Session = Depends(get_session)
                      ) -> list[CustodyGap]:
    """Records of the spoke's custody chain that never reached the hub: open (the spoke is
    asked to resend them), resolved (it did) or accepted as lost by an administrator."""
    _spoke(session, spoke_id)
    return list(session.exec(select(CustodyGap).where(CustodyGap.spoke_id == spoke_id)
                             .order_by(CustodyGap.id)))  # type: ignore[arg-type]


@router.post("/{spoke_id}/custody-gaps/{gap_id}/accept", response_model=CustodyGap)
def accept_custody_gap(spoke_id: str, gap_id: int, body: GapAccept, request: Request,
                       session: Session = Depends(get_session),
                       broker: StompClient = Depends(get_broker),
                       actor: str = Depends(acting(Role.ADMIN))) -> CustodyGap:
    """Accept that an open gap's records are lost (audited, and listed in the bundles of
    the experiments it touches): the chain continues after it, and cases still without a
    result at targets the spoke said were done are settled as lost in transit."""
    _spoke(session, spoke_id)
    try:
        gap, experiments = gaps.accept(session, gap_id, spoke_id, actor, body.reason)
    except gaps.NotAllowed as exc:
        raise HTTPException(409, str(exc)) from None
    for experiment_id in experiments:
        ingest.complete_if_settled(session, experiment_id)
    session.commit()
    if gap.last_missing is not None:  # results after the gap were refused while it was open
        try:
            gaps.send_resend(broker, request.app.state.signing_key, spoke_id,
                             gap.last_missing + 1)
            audit.record(session, "hub", "custody.resend_requested", spoke_id,
                         from_sequence=gap.last_missing + 1)
            session.commit()
        except PublishError as exc:
            raise HTTPException(503, f"gap accepted, but the records after it could not be "
                                     f"requested (broker unavailable): {exc}") from None
    session.refresh(gap)
    return gap
