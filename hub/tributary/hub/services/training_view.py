"""What the dashboard and the training event stream show of a training study: its state
and, per round attempt, who was targeted, who answered and whose masked update survived
into the sum (the dropouts), the epsilon spent, the loss when reported. Read only: the
round rows belong to the coordinator."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

from pydantic import BaseModel
from sqlmodel import Session, col, select

from tributary.hub.models import TrainingRound, TrainingStudy
from tributary.hub.services.plots import RoundPoint
from tributary.hub.services.training import rounds_of
from tributary.hub.services.training_export import model_digests
from tributary.protocol.training.privacy import RoundCharge, epsilon

OPEN_STAGES = ("keys", "shares", "masked", "consistency", "unmask")


class RoundRead(BaseModel):
    round: int
    attempt: int
    #: the open stage, or aggregated | retried | failed
    outcome: str
    outcome_reason: str | None
    targeted: list[str]
    joined: list[str]
    survived: list[str]
    #: Targeted but never joined; joined but sent no masked update (not in the sum);
    #: masked, then silent (its update is still in the sum: SecAgg+ recovers it).
    not_joined: list[str]
    dropped_before_masking: list[str]
    dropped_after_masking: list[str]
    epsilon_round: float | None
    epsilon_cumulative: float | None
    mean_loss: float | None
    global_model_out: str | None
    opened_at: datetime
    closed_at: datetime | None


class StudyRead(BaseModel):
    id: str
    name: str
    algorithm: str
    state: str
    stop_reason: str | None
    strategy: str
    rounds: int
    rounds_done: int
    min_participants: int
    spokes: list[str]
    clip_bound: float
    noise_multiplier: float
    delta: float
    epsilon_budget: float
    epsilon_spent: float | None
    global_model: str | None
    models: int
    created_by: str
    created_at: datetime
    finished_at: datetime | None


@lru_cache(maxsize=256)
def round_epsilon(noise_multiplier: float, delta: float) -> float:
    """What one round costs each participant (the same for every round of a study)."""
    return epsilon([RoundCharge(noise_multiplier=noise_multiplier)], delta)


def _survived(row: TrainingRound) -> list[str]:
    state = row.secagg or {}
    if row.stage in ("keys", "shares"):
        return []  # masking has not closed: nobody survived it yet
    return sorted(state.get("survivors") or state.get("masked") or {})


def round_read(study: TrainingStudy, row: TrainingRound) -> RoundRead:
    joined = sorted(row.num_examples)
    survived = _survived(row)
    masking_over = row.stage not in ("keys", "shares", "masked")
    consistency_over = row.stage not in ("keys", "shares", "masked", "consistency")
    signed = set((row.secagg or {}).get("signatures") or {})
    return RoundRead(
        round=row.round_index, attempt=row.attempt, outcome=row.stage,
        outcome_reason=row.outcome_reason, targeted=sorted(row.participants), joined=joined,
        survived=survived,
        not_joined=(sorted(set(row.participants) - set(joined))
                    if row.stage != "keys" else []),
        dropped_before_masking=(sorted(set(joined) - set(survived)) if masking_over else []),
        dropped_after_masking=(sorted(set(survived) - signed)
                               if consistency_over and row.stage != "retried" else []),
        epsilon_round=(round_epsilon(study.noise_multiplier, study.delta)
                       if row.stage == "aggregated" else None),
        epsilon_cumulative=row.epsilon_cumulative, mean_loss=row.mean_loss,
        global_model_out=row.global_model_out, opened_at=row.opened_at,
        closed_at=row.closed_at)


def study_read(study: TrainingStudy, rows: list[TrainingRound]) -> StudyRead:
    aggregated = [r for r in rows if r.stage == "aggregated"]
    spent = aggregated[-1].epsilon_cumulative if aggregated else None
    return StudyRead(
        id=study.id, name=study.name, algorithm=study.algorithm, state=study.state,
        stop_reason=study.stop_reason, strategy=study.strategy, rounds=study.rounds,
        rounds_done=len(aggregated), min_participants=study.min_participants,
        spokes=list(study.spokes), clip_bound=study.clip_bound,
        noise_multiplier=study.noise_multiplier, delta=study.delta,
        epsilon_budget=study.epsilon_budget, epsilon_spent=spent,
        global_model=study.global_model, models=len(model_digests(rows)),
        created_by=study.created_by, created_at=study.created_at,
        finished_at=study.finished_at)


def studies(session: Session) -> list[StudyRead]:
    """Every training study, newest first (the list page)."""
    found = session.exec(select(TrainingStudy).order_by(
        col(TrainingStudy.created_at).desc())).all()
    return [study_read(s, rounds_of(session, s.id)) for s in found]


def study_state(session: Session, study_id: str) -> dict[str, Any] | None:
    """The study and its rounds as JSON-ready data (None if unknown): the page's first
    render and every event of its stream."""
    study = session.get(TrainingStudy, study_id)
    if study is None:
        return None
    rows = rounds_of(session, study_id)
    return {"study": study_read(study, rows).model_dump(mode="json"),
            "rounds": [round_read(study, r).model_dump(mode="json") for r in rows]}


def points(rounds: list[dict[str, Any]]) -> list[RoundPoint]:
    """The curves' data from a study state's rounds."""
    return [RoundPoint(label=str(r["round"]) + (f".{r['attempt']}" if r["attempt"] > 1 else ""),
                       targeted=len(r["targeted"]), joined=len(r["joined"]),
                       survived=len(r["survived"]), epsilon=r["epsilon_cumulative"],
                       loss=r["mean_loss"]) for r in rounds]


def delta(old: dict[str, Any], new: dict[str, Any] | None) -> dict[str, Any] | None:
    """What changed between two study states: the study whole (it is small) and only the
    round attempts that changed or are new."""
    if new is None or old == new:
        return None
    before = {(r["round"], r["attempt"]): r for r in old["rounds"]}
    return {"study": new["study"], "delta": True,
            "rounds": [r for r in new["rounds"] if before.get((r["round"], r["attempt"])) != r]}


def is_over(state: dict[str, Any] | None) -> bool:
    return state is None or state["study"]["state"] != "running"
