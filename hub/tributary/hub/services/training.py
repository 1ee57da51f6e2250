"""Training studies: the hub's durable round state machine.

A round attempt moves ``keys -> shares -> masked -> consistency -> unmask -> aggregated``;
a stage closes when every spoke it waits for answered or at its deadline with whoever
did. A stage that cannot close (too few spokes for the minimum or the SecAgg+ threshold)
ends the attempt as ``retried`` and opens the next attempt of the same round, until the
study's ``max_attempts`` (then the study ``failed``). Every decision is audited. The
SecAgg+ server state is written back to the round's row after every call, in the caller's
transaction, so a hub restart resumes where the last commit left it, and a redelivered
message is idempotent (``SecAggServer.receive_*``).

The hub never holds a spoke's vector: masked vectors are loaded from the object store
through the ``load`` callable only when the sum is computed, and not stored.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlmodel import Session, select

from tributary.hub.models import Algorithm, TrainingRound, TrainingStudy, utcnow
from tributary.hub.services import access_grants, audit, credentials
from tributary.hub.services.access_grants import AccessRefused
from tributary.hub.services.launch import NotApproved, algorithm_ref, refuse_unapproved
from tributary.hub.services.server_optimisers import (
    HYPER_PARAMETERS,
    ServerOptimiser,
    settings_for,
)
from tributary.hub.services.training_optimiser import local_strategy
from tributary.protocol.cohorts.access import AccessGrant, StudyKind
from tributary.protocol.messages import AlgorithmRef
from tributary.protocol.objects import global_model_key
from tributary.protocol.training import rounds as msg
from tributary.protocol.training.privacy import (
    PrivacyLedger,
    RoundCharge,
    study_epsilon,
)
from tributary.protocol.training.secagg import (
    ConsistencyRequest,
    SecAggError,
    SecAggServer,
    ServerState,
    UnmaskRequest,
    make_round_config,
)
from tributary.protocol.training.update import (
    Quantisation,
    coordinate_range_for,
    dequantise_sum,
)

ACTOR = "hub:training"
#: The stages of an open attempt, in order; the others are its outcomes.
OPEN_STAGES = ("keys", "shares", "masked", "consistency", "unmask")


class TrainingError(ValueError):
    """A request the state machine refuses (unknown round, wrong stage...)."""


class AlgorithmRefused(TrainingError):
    """The study names a version that is unknown, not approved or revoked."""


class StudySpec(BaseModel):
    """What a coordinator launches a training study with."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    #: The registered algorithm version (its id): it must be approved and not revoked.
    algorithm_id: int = Field(ge=1, le=2**63 - 1)
    spokes: list[str] = Field(min_length=2)
    strategy: str = Field("fedavg", pattern="^(fedavg|fedprox|fedadam|fedyogi|fedadagrad)$")
    proximal_mu: float = Field(0.0, ge=0, allow_inf_nan=False)
    #: The server optimiser's hyper-parameters (fedadam, fedyogi, fedadagrad only; None:
    #: its default, see ``ServerOptimiser``).
    server_lr: float | None = None
    beta_1: float | None = None
    beta_2: float | None = None
    tau: float | None = None
    rounds: int = Field(ge=1, le=10_000)
    min_participants: int = Field(2, ge=2)
    round_deadline_s: float = Field(600.0, gt=0, allow_inf_nan=False)
    max_attempts: int = Field(3, ge=1, le=100)
    clip_bound: float = Field(gt=0, allow_inf_nan=False)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    epsilon_budget: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)
    #: Digest of the initial global model, already in the object store.
    initial_model: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    #: The approved data access request the study runs under (services/access_grants.py).
    access_request_id: str | None = Field(None, max_length=64)

    @model_validator(mode="after")
    def _optimiser(self) -> StudySpec:
        self.server_optimiser()
        return self

    def server_optimiser(self) -> ServerOptimiser | None:
        """The hub-side optimiser this study names, its settings validated."""
        return settings_for(self.strategy, {k: getattr(self, k) for k in HYPER_PARAMETERS})


def model_location(study_id: str, round_index: int, digest: str) -> str:
    """Where the global model going into round ``round_index`` lives in the store (the
    initial model at 0, round r's result at r + 1): derived from the digest, so a hub that
    restarts finds every model from the database alone."""
    return global_model_key(round_index, f"{study_id}-{digest.removeprefix('sha256:')[:16]}"
                                         ".safetensors")


def launch(session: Session, spec: StudySpec, actor: str,
           access_required: bool = False) -> TrainingStudy:
    """Create the study (rounds are opened by :func:`open_round`). A version that is not
    registered, not approved or revoked is refused (:class:`AlgorithmRefused`), and so is a
    study outside its data access request (:class:`AccessRefused`; none at all when one is
    ``access_required``), both audited in the session: the caller commits the refusal. The
    study's ε budget is spent from the request's in the caller's transaction."""
    if spec.min_participants > len(set(spec.spokes)):
        raise TrainingError("min_participants exceeds the study's spokes")
    optimiser = spec.server_optimiser()
    try:
        algorithm = refuse_unapproved(session.get(Algorithm, spec.algorithm_id),
                                      spec.algorithm_id)
    except NotApproved as exc:
        audit.record(session, actor, "training.launch_refused", spec.name,
                     algorithm_id=spec.algorithm_id, reason=str(exc))
        raise AlgorithmRefused(str(exc)) from None
    try:
        request = access_grants.check(session, spec.access_request_id, actor,
                                      access_grants.LaunchAsk(
                                          kind=StudyKind.TRAINING, spokes=spec.spokes,
                                          k=spec.min_participants,
                                          epsilon=spec.epsilon_budget), access_required)
        if request is not None:
            access_grants.spend(session, request, spec.epsilon_budget)
    except AccessRefused as exc:
        audit.record(session, actor, "training.launch_refused", spec.name,
                     algorithm_id=spec.algorithm_id, access_request=spec.access_request_id,
                     condition=exc.condition, reason=exc.reason)
        raise
    study = TrainingStudy(
        id=f"ts-{secrets.token_hex(6)}", name=spec.name, algorithm=algorithm_ref(
            algorithm).reference, algorithm_id=algorithm.id,
        strategy=spec.strategy, proximal_mu=spec.proximal_mu, rounds=spec.rounds,
        min_participants=spec.min_participants, round_deadline_s=spec.round_deadline_s,
        max_attempts=spec.max_attempts, clip_bound=spec.clip_bound,
        noise_multiplier=spec.noise_multiplier, epsilon_budget=spec.epsilon_budget,
        delta=spec.delta, spokes=sorted(set(spec.spokes)), global_model=spec.initial_model,
        ledgers={}, created_by=actor, access_request_id=spec.access_request_id,
        server_optimiser=None if optimiser is None else optimiser.model_dump(mode="json"),
    )
    session.add(study)
    audit.record(session, actor, "training.launch", study.id, algorithm=study.algorithm,
                 **spec.model_dump(exclude={"name", *HYPER_PARAMETERS}),
                 server_optimiser=study.server_optimiser)
    return study


def quantisation_for(study: TrainingStudy, participants: int) -> Quantisation:
    sigma = study.noise_multiplier * study.clip_bound
    return Quantisation(bits=32, coordinate_range=coordinate_range_for(study.clip_bound, sigma),
                        max_summands=participants)


def _ledgers(study: TrainingStudy) -> dict[str, PrivacyLedger]:
    return {s: PrivacyLedger.model_validate(v) for s, v in (study.ledgers or {}).items()}


def study_epsilon_now(study: TrainingStudy) -> float:
    return study_epsilon(_ledgers(study))


def _charge(study: TrainingStudy) -> RoundCharge:
    return RoundCharge(noise_multiplier=study.noise_multiplier)


def _finish(session: Session, study: TrainingStudy, state: str, reason: str) -> None:
    study.state, study.stop_reason, study.finished_at = state, reason, utcnow()
    session.add(study)
    audit.record(session, ACTOR, f"training.{state}", study.id, reason=reason)


def fail(session: Session, study: TrainingStudy, reason: str) -> None:
    """End a running study as ``failed`` (audited), e.g. its version was revoked."""
    _finish(session, study, "failed", reason)


def rounds_of(session: Session, study_id: str) -> list[TrainingRound]:
    return list(session.exec(select(TrainingRound).where(TrainingRound.study_id == study_id)
                             .order_by(TrainingRound.round_index, TrainingRound.attempt)))


def current_round(session: Session, study: TrainingStudy) -> TrainingRound | None:
    rows = rounds_of(session, study.id)
    return rows[-1] if rows else None


def open_round(session: Session, study: TrainingStudy, vector_length: int,
               round_index: int, attempt: int = 1,
               now: datetime | None = None) -> TrainingRound | None:
    """Open an attempt of round ``round_index`` on all the study's spokes, or stop the study
    if one more round would exceed its epsilon budget (every participant is charged the
    same, so the study's figure is that of the spoke that joined most)."""
    now = now or utcnow()
    if study.state != "running":
        raise TrainingError(f"study {study.id} is {study.state}")
    if round_index >= study.rounds:
        _finish(session, study, "finished", f"{study.rounds} rounds done")
        return None
    ledgers = _ledgers(study)
    worst = max(ledgers.values(), key=lambda ledger: len(ledger.charges), default=None)
    next_epsilon = (worst or PrivacyLedger(delta=study.delta)).epsilon_if(_charge(study))
    if next_epsilon > study.epsilon_budget:
        _finish(session, study, "stopped_budget",
                f"round {round_index} would spend epsilon {next_epsilon:.4f} > budget "
                f"{study.epsilon_budget}")
        return None
    round_id = f"{study.id}-r{round_index}-a{attempt}"
    lapsed = {s: r for s in study.spokes if (r := credentials.member_refusal(session, s))}
    if lapsed:  # no longer members: not asked into this round nor any later one
        audit.record(session, ACTOR, "training.spokes_excluded", study.id, round_id=round_id,
                     spokes=lapsed)
    members = [s for s in study.spokes if s not in lapsed]
    if len(members) < 2:
        fail(session, study, f"fewer than two members left for round {round_index}: "
                             + "; ".join(f"{s}: {r}" for s, r in sorted(lapsed.items())))
        return None
    config = make_round_config(round_id, members, bits=32, vector_length=vector_length)
    row = TrainingRound(
        study_id=study.id, round_index=round_index, attempt=attempt, round_id=round_id,
        stage="keys", stage_deadline=now + timedelta(seconds=study.round_deadline_s),
        participants=list(config.participants),
        secagg=SecAggServer.start(config).state.model_dump(mode="json"),
        num_examples={}, uploads={}, global_model_in=study.global_model, opened_at=now,
    )
    session.add(row)
    audit.record(session, ACTOR, "training.round_open", round_id,
                 participants=row.participants, threshold=config.threshold,
                 global_model=study.global_model)
    return row


def round_open_message(study: TrainingStudy, row: TrainingRound, model: msg.ObjectRef,
                       model_signature: str, upload_for: Callable[[str], str],
                       spoke: str, image: AlgorithmRef | None = None,
                       grant: AccessGrant | None = None) -> msg.RoundOpen:
    """The message that opens ``row`` for ``spoke`` (``upload_for`` gives the spoke's
    presigned upload location for this round; ``image``, the approved version as the
    spoke admits it: :func:`study_image`)."""
    state = ServerState.model_validate(row.secagg)
    return msg.RoundOpen(
        study_id=study.id, round_index=row.round_index, attempt=row.attempt,
        algorithm=study.algorithm, image=image, secagg=state.config, global_model=model,
        global_model_signature=model_signature,
        protection=msg.ProtectionSettings(
            clip_bound=study.clip_bound, noise_multiplier=study.noise_multiplier,
            delta=study.delta, quantisation=quantisation_for(study, len(row.participants))),
        strategy=local_strategy(study), proximal_mu=study.proximal_mu,
        upload=upload_for(spoke), access_request=grant,
    )


def study_image(session: Session, study: TrainingStudy) -> AlgorithmRef | None:
    """The study's approved version as every ``RoundOpen`` carries it, built exactly as a
    validation launch builds its ``AlgorithmRef``; None for a study without a registered
    version (launched before versions were required). A version revoked since the launch
    raises :class:`AlgorithmRefused`: no further round is opened with it."""
    if study.algorithm_id is None:
        return None
    try:
        algorithm = refuse_unapproved(session.get(Algorithm, study.algorithm_id),
                                      study.algorithm_id)
    except NotApproved as exc:
        raise AlgorithmRefused(str(exc)) from None
    ref = algorithm_ref(algorithm)
    if ref.reference != study.algorithm:
        raise AlgorithmRefused(f"version {study.algorithm_id} is now {ref.reference}, "
                               f"not the study's {study.algorithm}")
    return ref


def _server(row: TrainingRound) -> SecAggServer:
    return SecAggServer(ServerState.model_validate(row.secagg))


def _save(session: Session, row: TrainingRound, server: SecAggServer) -> None:
    row.secagg = server.state.model_dump(mode="json")
    session.add(row)


def receive(session: Session, row: TrainingRound, message: msg.TrainingFromSpoke,
            sender: str) -> None:
    """Apply one spoke message (``sender``: the transport-authenticated spoke id, which
    must be the message's own sender). Idempotent for a redelivered message."""
    if row.stage in ("aggregated", "retried", "failed"):
        raise TrainingError(f"round {row.round_id} is closed ({row.stage})")
    server = _server(row)
    inner: Any = {msg.Join: lambda m: m.advert, msg.Shares: lambda m: m.bundle,
                  msg.Masked: lambda m: m.masked, msg.Signature: lambda m: m.signature,
                  msg.UnmaskReply: lambda m: m.response}[type(message)](message)
    if inner.sender != sender:
        raise TrainingError(f"message names {inner.sender} but came from {sender}")
    if isinstance(message, msg.Join):
        server.receive_keys(message.advert)
        row.num_examples = {**row.num_examples, sender: message.num_examples}
        if message.loss is not None:
            row.losses = {**(row.losses or {}), sender: message.loss}
    elif isinstance(message, msg.Shares):
        server.receive_shares(message.bundle)
    elif isinstance(message, msg.Masked):
        if message.upload.digest != f"sha256:{message.masked.sha256}":
            raise TrainingError(f"{sender}'s upload digest differs from its masked input")
        server.receive_masked(message.masked)
        row.uploads = {**row.uploads, sender: message.upload.location}
    elif isinstance(message, msg.Signature):
        server.receive_signature(message.signature)
    else:
        server.receive_unmask(message.response)
    _save(session, row, server)


def _waiting_for(server: SecAggServer, row: TrainingRound) -> tuple[set[str], set[str]]:
    """(expected, answered) of the open stage; a spoke that refused the attempt is not
    expected."""
    s = server.state
    expected, answered = {
        "keys": (set(s.config.participants), set(s.keys)),
        "shares": (set(s.keys), set(s.bundles)),
        "masked": (set(s.bundles), set(s.masked)),
        "consistency": (set(s.survivors), set(s.signatures)),
        "unmask": (set(s.signatures), set(s.responses)),
    }[s.stage.value]
    return expected - set(row.refused or {}), answered


def all_answered(row: TrainingRound) -> bool:
    """True if every spoke the open stage waits for has answered it."""
    if row.stage not in OPEN_STAGES:
        return False
    expected, answered = _waiting_for(_server(row), row)
    return expected <= answered


#: Refusals that end a spoke's part in an attempt. A ``protocol`` refusal may answer a
#: message sent twice (a restarted hub sends the open stage again) while the spoke takes
#: part all right: that one is audited only, and the stage waits for the spoke as before.
DECISIVE_REFUSALS = ("image_not_trusted", "image_unavailable", "epsilon_cap",
                     "training_failed")


def count_out(session: Session, row: TrainingRound, refusal: msg.Refusal,
              sender: str) -> bool:
    """Stop waiting for ``sender`` in this attempt once it refused it for a decisive reason
    (audited), so that the open stage closes as soon as everyone else answered. True if it
    was counted out now."""
    if (refusal.study_id, refusal.round_index, refusal.attempt) != (
            row.study_id, row.round_index, row.attempt):
        raise TrainingError(f"{sender}'s refusal of {refusal.round_id} names another round")
    if sender not in row.participants:
        raise TrainingError(f"{sender} is not a participant of {row.round_id}")
    if (refusal.reason not in DECISIVE_REFUSALS or row.stage not in OPEN_STAGES
            or sender in (row.refused or {})):
        return False
    row.refused = {**(row.refused or {}), sender: refusal.reason}
    session.add(row)
    audit.record(session, ACTOR, "training.spoke_counted_out", row.round_id, spoke=sender,
                 stage=row.stage, reason=refusal.reason)
    return True


def ready(row: TrainingRound, now: datetime | None = None) -> bool:
    """True if the open stage may close: everyone answered, or its deadline passed."""
    if row.stage not in OPEN_STAGES:
        return False
    expected, answered = _waiting_for(_server(row), row)
    deadline = row.stage_deadline
    now = now or utcnow()
    if deadline.tzinfo is None:  # SQLite hands back naive UTC
        now = now.replace(tzinfo=None)
    return expected <= answered or now >= deadline


def _retry(session: Session, study: TrainingStudy, row: TrainingRound, reason: str,
           now: datetime) -> None:
    row.stage, row.outcome_reason, row.closed_at = "retried", reason, now
    session.add(row)
    audit.record(session, ACTOR, "training.round_retried", row.round_id, stage_reason=reason)
    if row.attempt >= study.max_attempts:
        _finish(session, study, "failed",
                f"round {row.round_index} failed {row.attempt} attempts: {reason}")


def advance(session: Session, study: TrainingStudy, row: TrainingRound,
            load: Callable[[str], np.ndarray], vector_length: int,
            now: datetime | None = None) -> tuple[list[tuple[str, BaseModel]], np.ndarray | None]:
    """Close the open stage if :func:`ready`. Returns the messages to send (receiver,
    message) and, when the round is aggregated, the weighted mean update. ``load(location)``
    reads a masked vector from the object store."""
    now = now or utcnow()
    if not ready(row, now):
        return [], None
    server = _server(row)
    stage = row.stage
    out: list[tuple[str, BaseModel]] = []
    try:
        if stage == "keys":
            joined = server.close_keys()
            if len(joined) < study.min_participants:
                raise SecAggError(f"{len(joined)} spokes joined, minimum is "
                                  f"{study.min_participants}")
            ref = max(row.num_examples[s] for s in joined)
            out = [(s, msg.Keys(keys=server.keys_for(s), weight_reference=ref)) for s in joined]
        elif stage == "shares":
            out = [(s, msg.Delivery(delivery=server.shares_for(s)))
                   for s in server.close_shares()]
        elif stage == "masked":
            out = [(r.receiver, msg.Consistency(request=r)) for r in server.close_masking()]
        elif stage == "consistency":
            out = [(r.receiver, msg.Unmask(request=r)) for r in server.close_consistency()]
        else:
            return [], _aggregate(session, study, row, server, load, now)
    except SecAggError as exc:
        _retry(session, study, row, f"{stage}: {exc}", now)
        return [], None
    row.stage = server.state.stage.value
    row.stage_deadline = now + timedelta(seconds=study.round_deadline_s)
    _save(session, row, server)
    audit.record(session, ACTOR, "training.stage_closed", row.round_id, stage=stage,
                 next_stage=row.stage, answered=sorted(_answered_at(server, stage)))
    return out, None


def _answered_at(server: SecAggServer, stage: str) -> set[str]:
    s = server.state
    return set({"keys": s.keys, "shares": s.bundles, "masked": s.masked,
                "consistency": s.signatures}.get(stage, {}))


def _aggregate(session: Session, study: TrainingStudy, row: TrainingRound,
               server: SecAggServer, load: Callable[[str], np.ndarray],
               now: datetime) -> np.ndarray | None:
    """Unmask the sum, divide by the survivors' weights (FedAvg by sample count), charge
    every spoke that joined the round, and close the round."""
    try:
        result = server.aggregate(lambda sender: load(row.uploads[sender]))
    except SecAggError as exc:
        _retry(session, study, row, f"unmask: {exc}", now)
        return None
    q = quantisation_for(study, len(row.participants))
    total = dequantise_sum(result.total, q, len(result.survivors))
    joined = sorted(server.state.keys)
    ref = max(row.num_examples[s] for s in joined)
    weight = sum(row.num_examples[s] / ref for s in result.survivors)
    mean = total / weight
    ledgers = _ledgers(study)
    for spoke in joined:
        ledger = ledgers.setdefault(spoke, PrivacyLedger(delta=study.delta))
        ledger.record(_charge(study))
    study.ledgers = {s: v.model_dump(mode="json") for s, v in ledgers.items()}
    row.epsilon_cumulative = study_epsilon(ledgers)
    row.mean_loss = mean_loss(row)
    row.stage, row.closed_at = "aggregated", now
    _save(session, row, server)
    session.add(study)
    audit.record(session, ACTOR, "training.round_aggregated", row.round_id,
                 survivors=list(result.survivors), dropped=list(result.dropped),
                 epsilon=row.epsilon_cumulative)
    return mean


def set_global_model(session: Session, study: TrainingStudy, row: TrainingRound,
                     digest: str) -> None:
    """Record the next global model (written by the caller to the object store)."""
    row.global_model_out = digest
    study.global_model = digest
    session.add(row)
    session.add(study)
    audit.record(session, ACTOR, "training.global_model", study.id, digest=digest,
                 round=row.round_index)


def mean_loss(row: TrainingRound) -> float | None:
    """The joined spokes' local training losses weighted by their sample counts (None if
    none reported one): a figure the spokes release in clear with ``Join``."""
    losses = {s: v for s, v in (row.losses or {}).items() if s in row.num_examples}
    total = sum(row.num_examples[s] for s in losses)
    return sum(v * row.num_examples[s] for s, v in losses.items()) / total if total else None


class NextStep(BaseModel):
    """What the round loop does next for a study, derived from the database alone (so a
    restarted hub resumes where the last commit left it): open an attempt, drive the open
    one, or nothing (the study ended). ``model_index`` and ``model_digest`` name the global
    model going into that attempt (see :func:`model_location`)."""

    model_config = ConfigDict(frozen=True)

    action: Literal["open", "drive", "done"]
    round_index: int = 0
    attempt: int = 1
    round_id: str | None = None
    model_index: int = 0
    model_digest: str | None = None


def next_step(session: Session, study: TrainingStudy) -> NextStep:
    if study.state != "running":
        return NextStep(action="done")
    last = current_round(session, study)
    if last is None:
        return NextStep(action="open", model_digest=study.global_model)
    if last.stage in OPEN_STAGES:
        return NextStep(action="drive", round_index=last.round_index, attempt=last.attempt,
                        round_id=last.round_id, model_index=last.round_index,
                        model_digest=last.global_model_in)
    if last.stage == "aggregated":
        if last.global_model_out is None:  # the two are committed together
            raise TrainingError(f"round {last.round_id} is aggregated without a next model")
        return NextStep(action="open", round_index=last.round_index + 1,
                        model_index=last.round_index + 1, model_digest=last.global_model_out)
    return NextStep(action="open", round_index=last.round_index, attempt=last.attempt + 1,
                    model_index=last.round_index, model_digest=last.global_model_in)


def pending_messages(study: TrainingStudy, row: TrainingRound, model: msg.ObjectRef,
                     model_signature: str, upload_for: Callable[[str], str],
                     image: AlgorithmRef | None = None,
                     grant: AccessGrant | None = None) -> list[tuple[str, BaseModel]]:
    """The messages of the open stage, to each spoke that has not answered it yet: what a
    restarted hub sends again, since it may have stopped between committing a stage and
    sending its messages (a spoke answers a repeated message as it did the first time, or
    refuses it if it already moved on)."""
    if row.stage not in OPEN_STAGES:
        return []
    server = _server(row)
    s = server.state
    expected, answered = _waiting_for(server, row)
    todo = sorted(expected - answered)
    if row.stage == "keys":
        return [(r, round_open_message(study, row, model, model_signature, upload_for, r,
                                       image, grant)) for r in todo]
    if row.stage == "shares":
        ref = max(row.num_examples[v] for v in s.keys)
        return [(r, msg.Keys(keys=server.keys_for(r), weight_reference=ref)) for r in todo]
    if row.stage == "masked":
        return [(r, msg.Delivery(delivery=server.shares_for(r))) for r in todo]
    cfg = s.config
    if row.stage == "consistency":
        return [(r, msg.Consistency(request=ConsistencyRequest(
            round_id=cfg.round_id, receiver=r, survivors=s.survivors, dropped=s.dropped)))
            for r in todo]
    signatures = {v: m.signature for v, m in sorted(s.signatures.items())}
    return [(r, msg.Unmask(request=UnmaskRequest(
        round_id=cfg.round_id, receiver=r, survivors=s.survivors, dropped=s.dropped,
        signatures=signatures))) for r in todo]
