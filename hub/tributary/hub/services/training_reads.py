"""What the API (and the dashboard) shows of a training study: built from the rows alone,
so every process of the hub reads the same thing. No vector, no share, no key material:
sample counts, stages, the survivors of each round and ε."""

from __future__ import annotations

from functools import lru_cache

from sqlmodel import Session, select

from tributary.hub.models import Spoke, TrainingRound, TrainingStudy
from tributary.hub.schemas import TrainingRoundRead, TrainingStudyDetail, TrainingStudyRead
from tributary.hub.services import training
from tributary.hub.services.enrolment import enrolled_spokes
from tributary.protocol.training.privacy import PrivacyLedger, RoundCharge


@lru_cache(maxsize=256)
def epsilon_of_one_round(noise_multiplier: float, delta: float) -> float:
    return PrivacyLedger(delta=delta).epsilon_if(RoundCharge(noise_multiplier=noise_multiplier))


def round_read(study: TrainingStudy, row: TrainingRound) -> TrainingRoundRead:
    secagg = row.secagg or {}
    joined = dict(sorted((row.num_examples or {}).items()))
    survivors = sorted(secagg.get("survivors") or secagg.get("masked") or {})
    closed = row.stage == "aggregated" or secagg.get("stage") in ("consistency", "unmask")
    return TrainingRoundRead(
        round=row.round_index, attempt=row.attempt, round_id=row.round_id, stage=row.stage,
        stage_deadline=row.stage_deadline, participants=list(row.participants),
        joined=joined, survivors=survivors,
        dropouts=sorted(set(joined) - set(survivors)) if closed else [],
        epsilon_round=(epsilon_of_one_round(study.noise_multiplier, study.delta)
                       if joined else None),
        epsilon_cumulative=row.epsilon_cumulative, mean_loss=row.mean_loss,
        global_model_in=row.global_model_in, global_model_out=row.global_model_out,
        outcome_reason=row.outcome_reason, opened_at=row.opened_at, closed_at=row.closed_at)


def study_read(session: Session, study: TrainingStudy) -> TrainingStudyRead:
    rows = training.rounds_of(session, study.id)
    return TrainingStudyRead(
        **study.model_dump(exclude={"ledgers"}),
        epsilon_spent=training.study_epsilon_now(study),
        rounds_done=sum(1 for r in rows if r.stage == "aggregated"))


def study_detail(session: Session, study: TrainingStudy) -> TrainingStudyDetail:
    return TrainingStudyDetail(
        **study_read(session, study).model_dump(),
        round_list=[round_read(study, r) for r in training.rounds_of(session, study.id)])


def study_reads(session: Session) -> list[TrainingStudyRead]:
    studies = session.exec(select(TrainingStudy).order_by(TrainingStudy.created_at)).all()
    return [study_read(session, s) for s in studies]


def spoke_refusals(session: Session, spokes: list[str]) -> dict[str, str]:
    """Why each of ``spokes`` cannot take part (unknown, revoked, sandbox, no active key);
    empty when all can."""
    enrolled = enrolled_spokes(session)
    refusals: dict[str, str] = {}
    for spoke_id in spokes:
        spoke = session.get(Spoke, spoke_id)
        if spoke is None:
            refusals[spoke_id] = "not registered"
        elif spoke.revoked_at is not None:
            refusals[spoke_id] = f"revoked at {spoke.revoked_at.isoformat()}"
        elif spoke.sandbox:
            refusals[spoke_id] = "a sandbox spoke (synthetic data only)"
        elif spoke_id not in enrolled:
            refusals[spoke_id] = "no active enrolled key"
    return refusals
