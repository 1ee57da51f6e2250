"""A spoke whose membership lapses stops taking part in what is running. After each pass of
the credential watch (:mod:`tributary.hub.services.credentials`), every spoke whose stored
credential is refused (revoked, expired, keys no longer bound) is withdrawn from each
launched experiment it still takes part in (:func:`tributary.hub.services.control.withdraw`:
a signed cancellation to that spoke only; the others go on and the study completes without
it). What it sends for a study afterwards is refused (:mod:`tributary.hub.services.ingest`),
and so are its training, vertical and PSI messages while its credential stays refused
(:func:`tributary.hub.services.credentials.member_refusal`). Unfinished PSIs and vertical
studies it is a party of fail (they need every party); training studies leave it out of
their next rounds (:func:`tributary.hub.services.training.open_round`).

A withdrawal is not undone when the credential becomes valid again: a coordinator launches
a new study (an automatic return would let a site drop in and out of a study's results)."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from tributary.hub.models import (
    TERMINAL_TARGET_STATES,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    PsiMember,
    PsiRun,
    SpokeCredential,
    VerticalStudy,
)
from tributary.hub.services import audit, control, credentials, ingest, psi, vertical
from tributary.hub.settings import HubSettings
from tributary.protocol.broker import PublishError, StompClient
from tributary.protocol.signing import SigningKey

log = logging.getLogger(__name__)

REFUSED = "refused"


def reason_for(credential_reason: str) -> str:
    """The reason a withdrawal carries (the spoke, the study page and the bundle show it)."""
    return f"membership credential refused: {credential_reason}"


def lapsed(session: Session) -> dict[str, str]:
    """Spokes whose stored credential the last check refused, each with the reason."""
    return {row.spoke_id: row.reason for row in session.exec(
        select(SpokeCredential).where(SpokeCredential.state == REFUSED))}


def _running_targets(session: Session, spoke_ids: list[str]
                     ) -> list[tuple[ExperimentTarget, Experiment]]:
    return list(session.exec(
        select(ExperimentTarget, Experiment)
        .join(Experiment, col(Experiment.id) == col(ExperimentTarget.experiment_id))
        .where(col(ExperimentTarget.spoke_id).in_(spoke_ids),
               Experiment.state == ExperimentState.LAUNCHED,
               col(ExperimentTarget.withdrawn_at).is_(None),
               col(ExperimentTarget.state).not_in(list(TERMINAL_TARGET_STATES)))
        .order_by(col(ExperimentTarget.experiment_id))).all())


def withdraw_lapsed(session: Session, client: StompClient, key: SigningKey,
                    expiry: timedelta, policy: credentials.Policy | None = None
                    ) -> dict[str, list[str]]:
    """Withdraw every lapsed spoke from every launched experiment it still takes part in;
    {spoke: experiments withdrawn from now}. A cancellation that cannot be sent (the
    broker away) leaves that target as it was, for the next pass. With ``policy``, nobody
    is withdrawn while the hub cannot check any credential (an unreadable authority, no
    status list that verifies): that refuses every spoke at once, and is the hub's fault
    or the authority's, not a site's lapse; launches stay refused meanwhile."""
    found = lapsed(session)
    if not found:
        return {}
    problem = credentials.policy_problem(policy) if policy is not None else None
    if problem is not None:
        log.error("withdrawing no spoke while the hub cannot check credentials: %s", problem)
        return {}
    withdrawn: dict[str, list[str]] = {}
    for target, experiment in _running_targets(session, sorted(found)):
        spoke_id = target.spoke_id
        try:
            done = control.withdraw(session, client, key, experiment, spoke_id, "hub",
                                    reason_for(found[spoke_id]), expiry)
        except PublishError as exc:
            session.rollback()
            log.warning("could not withdraw %s from %s yet: %s", spoke_id, experiment.id, exc)
            continue
        if done:
            withdrawn.setdefault(spoke_id, []).append(experiment.id)
            ingest.complete_if_settled(session, experiment.id)  # the others may be done
            session.commit()
    _end_cohort_studies(session, found)
    for spoke_id, experiments in sorted(withdrawn.items()):
        audit.record(session, "hub", "spoke.withdrawn", spoke_id,
                     reason=reason_for(found[spoke_id]), experiments=experiments)
        log.warning("withdrew %s from %d running experiment(s): %s", spoke_id,
                    len(experiments), found[spoke_id])
    session.commit()
    return withdrawn


def _end_cohort_studies(session: Session, found: dict[str, str]) -> None:
    """Unfinished PSIs and vertical studies need every party: one that lapsed ends them
    (failed, with the reason, audited; the vertical coordinator then tells both parties
    to finish). Training studies go on without it (services/training.py)."""
    for member, run in session.exec(
            select(PsiMember, PsiRun).join(PsiRun, col(PsiRun.id) == col(PsiMember.psi_id))
            .where(col(PsiMember.spoke_id).in_(sorted(found)),
                   col(PsiRun.state).in_(["requested", "running"]))).all():
        psi.withdraw(session, run.id, member.spoke_id, reason_for(found[member.spoke_id]))
    for study in session.exec(select(VerticalStudy).where(
            col(VerticalStudy.state).in_(sorted(vertical.OPEN))).with_for_update()).all():
        lapsed_parties = [s for s in vertical.parties(study) if s in found]
        if lapsed_parties:
            vertical.fail(session, study, "; ".join(
                f"{s}: {reason_for(found[s])}" for s in lapsed_parties))
    session.commit()


def bundle_record(session: Session, experiment_id: str) -> list[dict[str, object]]:
    """The study's withdrawals, as its bundle holds them (its audit events)."""
    return [{"at": e.at.isoformat() if e.at else None, "actor": e.actor,
             "action": e.action, **e.detail}
            for e in audit.search(session, action="experiment.spoke_withdrawn",
                                  target=experiment_id, limit=100_000)]


def start(settings: HubSettings, engine: Engine, client: StompClient, key: SigningKey
          ) -> credentials.Watch | None:
    """The credential watch, withdrawing lapsed spokes after each pass (None: the hub
    trusts no federation authority, so no membership can lapse)."""
    expiry = timedelta(days=settings.default_expiry_days)
    policy = credentials.policy(settings)

    def after_pass() -> None:
        with Session(engine) as session:
            withdraw_lapsed(session, client, key, expiry, policy)

    return credentials.start(settings, engine, after_pass)
