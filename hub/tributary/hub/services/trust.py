"""Will a spoke run a version? Answered from what the spoke itself reported in its
heartbeats (the publisher keys it trusts, whether it is a sandbox) and from what the hub
knows (revocation, enrolment), so a launch that every spoke would refuse is refused at the
hub, with each spoke's reason, before anything is sent."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError
from sqlmodel import Session, select

from tributary.hub.models import Algorithm, Spoke
from tributary.hub.services.enrolment import active_keys
from tributary.protocol.messages import RunLimits, SiteCapacity
from tributary.protocol.signing import SignatureError, envelope_signer


@dataclass(frozen=True)
class SpokeVerdict:
    """One spoke's expected answer to one version: ``runs`` or the reason it will not."""

    spoke_id: str
    name: str
    runs: bool
    reason: str
    sandbox: bool
    #: Why not, as a kind: ``publisher`` (its reported trust excludes the version's
    #: publisher), ``unreported`` (it never reported its trust), or ``boundary`` (revoked,
    #: unenrolled, the sandbox boundary, the version itself), which no setting relaxes, or
    #: ``limits`` (the study asks for more than the spoke's reported capacity), or
    #: ``credential`` (its membership credential is missing, expired or revoked).
    refusal: str = ""


def publisher_keyid(algorithm: Algorithm) -> str | None:
    """The key id that signed the version's release statement (None: unsigned)."""
    if not algorithm.release_signature:
        return None
    try:
        return envelope_signer(algorithm.release_signature)
    except (SignatureError, KeyError, TypeError, IndexError):
        return None


def verdict(session: Session, spoke: Spoke, algorithm: Algorithm,
            sandbox_study: bool = False) -> SpokeVerdict:
    """Whether ``spoke`` will run ``algorithm`` (in a sandbox study or an ordinary one)."""

    def no(reason: str, refusal: str = "boundary") -> SpokeVerdict:
        return SpokeVerdict(spoke.id, spoke.name, False, reason, spoke.sandbox, refusal)

    if spoke.revoked_at is not None:
        return no("the spoke is revoked")
    if not active_keys(session, spoke.id):
        return no("the spoke has no enrolled key")
    if sandbox_study and not spoke.sandbox:
        return no("not a sandbox spoke: it holds real data and runs only reviewed versions")
    if not sandbox_study and spoke.sandbox:
        return no("a sandbox spoke runs sandbox studies only (tributary algorithm try)")
    if sandbox_study:
        if spoke.trust_reported_at is not None and not spoke.trust_sandbox:
            return no("enrolled as a sandbox, but the spoke reports it does not run "
                      "sandbox grants ([trust] sandbox = true in its configuration)")
        return SpokeVerdict(spoke.id, spoke.name, True, "sandbox: runs the developer's own "
                            "unreviewed version on synthetic data", True)
    if algorithm.revoked_at is not None:
        return no(f"the version's approval was revoked: {algorithm.revoked_reason or ''}")
    if algorithm.approval is None:
        return no("the version is not approved under the review rule")
    if spoke.trust_reported_at is None:
        return no("the spoke never reported which publishers it trusts (no heartbeat "
                  "from it yet, or it predates protocol 1.2)", "unreported")
    if not spoke.trust_required:
        return SpokeVerdict(spoke.id, spoke.name, True,
                            "pins no publisher: runs any approved version", False)
    keyid = publisher_keyid(algorithm)
    if keyid is None:
        return no("the spoke requires a publisher's release signature; this version has none",
                  "publisher")
    if keyid not in (spoke.trusted_publishers or []):
        who = algorithm.publisher or "its publisher"
        return no(f"the spoke does not trust {who} (key id {keyid[:16]}…); its data steward "
                  f"can add the key with `tributary spoke trust add`", "publisher")
    return SpokeVerdict(spoke.id, spoke.name, True,
                        f"trusts {algorithm.publisher or keyid[:16]}", False)


def limits_verdict(spoke: Spoke | None, limits: RunLimits) -> SpokeVerdict | None:
    """The spoke's refusal of a study asking for ``limits`` (more GPUs than a case may have
    there, or any on an executor that cannot pass them on), judged by the capacity it last
    reported; None if it will run it or never reported (it then decides on arrival)."""
    if spoke is None or spoke.capacity is None:
        return None
    try:
        capacity = SiteCapacity.model_validate(spoke.capacity)
    except ValidationError:
        return None
    reason = capacity.refusal(limits)
    if reason is None:
        return None
    return SpokeVerdict(spoke.id, spoke.name, False, reason, spoke.sandbox, "limits")


def verdicts(session: Session, algorithm: Algorithm, sandbox_study: bool = False,
             spoke_ids: list[str] | None = None) -> list[SpokeVerdict]:
    """Every spoke's verdict (or only those of ``spoke_ids``), by spoke id."""
    query = select(Spoke).order_by(Spoke.id)
    if spoke_ids is not None:
        query = query.where(Spoke.id.in_(spoke_ids))  # type: ignore[attr-defined]
    return [verdict(session, s, algorithm, sandbox_study) for s in session.exec(query)]


class LaunchRefused(ValueError):
    """Some target spokes would refuse the version: nothing was sent to any of them."""

    def __init__(self, refusals: list[SpokeVerdict]) -> None:
        self.refusals = refusals
        super().__init__("; ".join(f"{v.spoke_id}: {v.reason}" for v in refusals))

    def detail(self) -> dict[str, object]:
        """The API's 409 body: a sentence and each spoke's reason."""
        return {"message": f"not launched: {len(self.refusals)} target spoke(s) would "
                           f"refuse this version; nothing was sent",
                "refusals": [{"spoke_id": v.spoke_id, "reason": v.reason}
                             for v in self.refusals]}
