"""Vertical training studies at the hub: creating one, applying the spokes' signed
messages to its row, and what the hub sends next. The state lives in the study's row
(:class:`~tributary.hub.models.VerticalStudy`); the broker and object-store I/O is in
:mod:`tributary.hub.vertical_coordinator`.

A stage closes when both spokes answered it; each answer is checked (the right round and
stage, its object in the sender's own area, the right number of values, a loss only from
the label party) and audited with sizes only. Everything the hub sends is derived from the
row (:func:`pending_messages`), so a restarted hub sends again what is unanswered and a
duplicate answer changes nothing."""

from __future__ import annotations

import uuid
from typing import Any

from sqlmodel import Session, col, select

from tributary.hub.models import VerticalStudy, utcnow
from tributary.hub.services import access_grants, audit
from tributary.hub.services.access_grants import AccessRefused
from tributary.protocol.cohorts import vertical as vmsg
from tributary.protocol.cohorts.access import StudyKind
from tributary.protocol.objects import global_model_key, spoke_prefix
from tributary.protocol.training.rounds import ObjectRef

ACTOR = "hub:vertical"
OPEN = ("inviting", "running")


class VerticalError(ValueError):
    """A request or message the hub refuses, with the reason."""


def create(session: Session, *, name: str, psi_id: str, features_spoke: str,
           label_spoke: str, features_attributes: list[str], label_attributes: list[str],
           label: str, positive: Any, hyperparameters: vmsg.Hyperparameters,
           release_coefficients: bool, created_by: str, access_request_id: str | None = None,
           access_required: bool = False) -> VerticalStudy:
    """A new study in state ``inviting``; the invitations are its first pending messages.
    The invitations are validated here as the spokes will validate them. Its access
    request (``access_required``: the hub asks for one) must allow vertical studies, both
    spokes and every attribute it reads, else :class:`AccessRefused` (audited)."""
    if features_spoke == label_spoke:
        raise VerticalError("the two parties are two different spokes")
    try:
        access_grants.check(session, access_request_id, created_by, access_grants.LaunchAsk(
            kind=StudyKind.VERTICAL, spokes=[features_spoke, label_spoke],
            attributes=list(dict.fromkeys([*features_attributes, *label_attributes, label]))),
            access_required)
    except AccessRefused as exc:
        audit.record(session, created_by, "vertical.launch_refused", name,
                     access_request=access_request_id, condition=exc.condition,
                     reason=exc.reason)
        raise
    study = VerticalStudy(
        id=uuid.uuid4().hex, name=name, psi_id=psi_id, features_spoke=features_spoke,
        label_spoke=label_spoke, features_attributes=features_attributes,
        label_attributes=label_attributes, label=label, positive=positive,
        hyperparameters=hyperparameters.model_dump(), release_coefficients=release_coefficients,
        created_by=created_by, access_request_id=access_request_id)
    try:
        invitations(study)
    except ValueError as exc:
        raise VerticalError(str(exc)) from None
    session.add(study)
    audit.record(session, created_by, "vertical.created", study.id, psi=psi_id,
                 features_spoke=features_spoke, label_spoke=label_spoke,
                 features_attributes=features_attributes, label_attributes=label_attributes,
                 label=label, release_coefficients=release_coefficients,
                 hyperparameters=study.hyperparameters)
    return study


def hyper(study: VerticalStudy) -> vmsg.Hyperparameters:
    return vmsg.Hyperparameters.model_validate(study.hyperparameters)


def peer(study: VerticalStudy, spoke: str) -> str:
    return study.label_spoke if spoke == study.features_spoke else study.features_spoke


def parties(study: VerticalStudy) -> tuple[str, str]:
    return study.features_spoke, study.label_spoke


def invitations(study: VerticalStudy) -> list[vmsg.Invite]:
    common = {"study_id": study.id, "psi_id": study.psi_id, "hyperparameters": hyper(study),
              "release_coefficients": study.release_coefficients}
    return [
        vmsg.Invite(**common, spoke_id=study.features_spoke, role="features",
                    attributes=study.features_attributes, peer=study.label_spoke),
        vmsg.Invite(**common, spoke_id=study.label_spoke, role="label",
                    attributes=study.label_attributes, label=study.label,
                    positive=study.positive, peer=study.features_spoke),
    ]


def relay_location(study: VerticalStudy, spoke: str) -> str:
    """Where the hub copies a spoke's object of the current stage for its peer to read."""
    return global_model_key(study.round_index, f"v-{study.id}-{study.stage}-{spoke}.bin")


def _answer(study: VerticalStudy, spoke: str) -> vmsg.Reply | None:
    raw = study.answers.get(spoke)
    return None if raw is None else vmsg.Reply.model_validate(raw)


def relayed(study: VerticalStudy, spoke: str) -> ObjectRef:
    """The spoke's object of the previous stage, as the hub copied it for the peer."""
    return ObjectRef.model_validate(study.parties[spoke]["relayed"])


def pending_messages(study: VerticalStudy) -> list[vmsg.Invite | vmsg.Step | vmsg.Finish]:
    """What the spokes that have not answered the current stage are to receive."""
    if study.state == "inviting":  # a spoke that answered keeps the invitation itself
        return [i for i in invitations(study) if i.spoke_id not in study.parties]
    if study.stage == "finish":
        state = {"completed": "completed", "failed": "failed", "refused": "failed"}.get(
            study.state, "cancelled")
        return [vmsg.Finish(study_id=study.id, spoke_id=s, state=state)  # type: ignore[arg-type]
                for s in told_to_finish(study)]
    if study.state != "running":
        return []
    out: list[vmsg.Invite | vmsg.Step | vmsg.Finish] = []
    for spoke in parties(study):
        if spoke in study.answers:
            continue
        other = peer(study, spoke)
        base = {"study_id": study.id, "spoke_id": spoke, "round_index": study.round_index,
                "stage": study.stage}
        if study.stage == "share":
            out.append(vmsg.Step(**base))
        elif study.stage == "cross":
            out.append(vmsg.Step(**base, peer_object=relayed(study, other), peer_key=vmsg.PublicKey(
                n=study.parties[other]["public_key"])))
        elif study.stage == "decrypt":
            out.append(vmsg.Step(**base, peer_object=relayed(study, other),
                                 peer_features=study.parties[other]["features"]))
        else:  # apply: the peer decrypted this spoke's masked values
            values = study.parties[spoke].get("decrypted_for_me")
            out.append(vmsg.Step(**base, values=values))
    return out


def apply_status(session: Session, study: VerticalStudy, sender: str,
                 status: vmsg.Status) -> None:
    """A spoke held, accepted or refused the invitation."""
    if study.state != "inviting":
        if status.state == "refused" and study.state == "running":
            fail(session, study, f"{sender} refused: {status.reason}")
        elif status.state in ("held", "accepted") and study.stage == "finish" \
                and sender not in study.parties:
            # Its answer crossed the other's refusal: it holds the study and is told it ended.
            study.parties = {**study.parties, sender: {"state": status.state}}
            session.add(study)
        return
    if study.parties.get(sender, {}).get("state") == status.state:
        return  # the same answer again (a resent invitation's)
    parties_now = dict(study.parties)
    entry: dict[str, Any] = {"state": status.state, "reason": status.reason}
    if status.state == "accepted":
        assert status.public_key is not None
        entry.update(public_key=status.public_key.n, rows=status.rows,
                     features=status.features)
    parties_now[sender] = entry
    study.parties = parties_now
    audit.record(session, ACTOR, f"vertical.{status.state}", study.id, spoke=sender,
                 reason=status.reason, rows=status.rows, features=status.features)
    if status.state == "refused":
        study.state, study.reason, study.stage = "refused", f"{sender}: {status.reason}", "finish"
        study.finished_at = utcnow()
    elif all(parties_now.get(s, {}).get("state") == "accepted" for s in parties(study)):
        a, b = (parties_now[s] for s in parties(study))
        if a["rows"] != b["rows"]:
            fail(session, study, f"the spokes link {a['rows']} and {b['rows']} rows: not the "
                 "same cohort")
        elif a["public_key"] == b["public_key"]:
            fail(session, study, "the two spokes announced the same key")
        elif b["features"] != len(study.label_attributes) + 1 \
                or a["features"] != len(study.features_attributes):
            fail(session, study, "a spoke announced another number of columns than asked")
        else:
            study.state, study.stage, study.round_index = "running", "share", 0
            audit.record(session, ACTOR, "vertical.started", study.id, rows=a["rows"])
    session.add(study)


def check_reply(study: VerticalStudy, sender: str, reply: vmsg.Reply) -> None:
    """Raise :class:`VerticalError` unless ``reply`` answers the current stage correctly."""
    if study.state != "running" or reply.round_index != study.round_index \
            or reply.stage != study.stage:
        raise VerticalError(f"{sender} answered round {reply.round_index} {reply.stage}; the "
                            f"study is at round {study.round_index} {study.stage}")
    needs_object = reply.stage in ("share", "cross")
    if needs_object != (reply.object is not None):
        raise VerticalError(f"a {reply.stage} answer {'needs' if needs_object else 'has no'} "
                            "object")
    if reply.object is not None and not reply.object.location.startswith(spoke_prefix(sender)):
        raise VerticalError(f"{sender} points at an object outside its own area")
    if reply.stage == "decrypt":
        expected = study.parties[peer(study, sender)]["features"]
        if reply.values is None or len(reply.values) != expected:
            raise VerticalError(f"{sender} decrypted another number of values than "
                                f"{expected}")
        if (reply.loss is not None) != (sender == study.label_spoke):
            raise VerticalError("only the label spoke reports the loss")
    elif reply.values is not None or reply.loss is not None:
        raise VerticalError(f"a {reply.stage} answer carries no values")


def apply_reply(session: Session, study: VerticalStudy, sender: str, reply: vmsg.Reply) -> bool:
    """Keep a spoke's answer to the current stage; False for a duplicate (ignored)."""
    if sender in study.answers and study.state == "running" \
            and reply.round_index == study.round_index and reply.stage == study.stage:
        return False
    check_reply(study, sender, reply)
    study.answers = {**study.answers, sender: reply.model_dump(mode="json")}
    audit.record(session, ACTOR, "vertical.answered", study.id, spoke=sender,
                 round=reply.round_index, stage=reply.stage,
                 size=reply.object.size if reply.object else None,
                 values=len(reply.values or []))
    session.add(study)
    return True


def stage_complete(study: VerticalStudy) -> bool:
    return study.state == "running" and all(s in study.answers for s in parties(study))


def advance(session: Session, study: VerticalStudy,
            copies: dict[str, ObjectRef] | None = None) -> None:
    """Close the current stage (both answered): the next stage, round, or the end.
    ``copies`` (share and cross stages): each spoke's object as the coordinator copied it
    to the global area for the peer."""
    answers = {s: _answer(study, s) for s in parties(study)}
    if study.stage in ("share", "cross"):
        assert copies is not None and set(copies) == set(parties(study))
        study.parties = {s: {**p, "relayed": copies[s].model_dump(mode="json")}
                         if s in copies else p for s, p in study.parties.items()}
        audit.record(session, ACTOR, "vertical.relayed", study.id, round=study.round_index,
                     stage=study.stage, sizes={s: r.size for s, r in copies.items()})
    if study.stage == "decrypt":
        label = answers[study.label_spoke]
        assert label is not None and label.loss is not None
        study.losses = [*study.losses, label.loss]
        new = dict(study.parties)
        for spoke in parties(study):  # what the peer decrypted is this spoke's
            theirs = answers[peer(study, spoke)]
            assert theirs is not None
            new[spoke] = {**new[spoke], "decrypted_for_me": theirs.values}
        study.parties = new
    nxt = {"share": "cross", "cross": "decrypt", "decrypt": "apply", "apply": "share"}
    study.stage = nxt[study.stage]
    study.answers = {}
    if study.stage == "share":
        study.round_index += 1
        new = {s: {k: v for k, v in p.items() if k not in ("decrypted_for_me", "relayed")}
               for s, p in study.parties.items()}
        study.parties = new
        audit.record(session, ACTOR, "vertical.round_closed", study.id,
                     round=study.round_index - 1, loss=study.losses[-1] if study.losses else None)
        if study.round_index >= hyper(study).rounds:
            study.state, study.stage, study.finished_at = "completed", "finish", utcnow()
            audit.record(session, ACTOR, "vertical.completed", study.id,
                         rounds=study.round_index)
    session.add(study)


def apply_final(session: Session, study: VerticalStudy, sender: str, final: vmsg.Final) -> None:
    if sender in study.final:
        return
    if final.coefficients is not None and not (study.release_coefficients
                                               and study.state == "completed"):
        raise VerticalError(f"{sender} released coefficients the study did not ask for")
    study.final = {**study.final, sender: final.model_dump(mode="json")}
    audit.record(session, ACTOR, "vertical.final", study.id, spoke=sender,
                 released=final.coefficients is not None)
    session.add(study)


def fail(session: Session, study: VerticalStudy, reason: str) -> None:
    study.state, study.reason, study.stage = "failed", reason[:2000], "finish"
    study.answers, study.finished_at = {}, utcnow()
    audit.record(session, ACTOR, "vertical.failed", study.id, reason=reason[:2000])
    session.add(study)


def told_to_finish(study: VerticalStudy) -> list[str]:
    """The spokes of an ended study that still hold it (accepted, or held for their
    steward) and have not confirmed its end."""
    return [s for s in parties(study) if s not in study.final
            and study.parties.get(s, {}).get("state") in ("held", "accepted")]


def open_studies(session: Session) -> list[str]:
    """Studies with something left to do: inviting, running, or a finish unanswered."""
    rows = session.exec(select(VerticalStudy).order_by(col(VerticalStudy.created_at))).all()
    return [s.id for s in rows if s.state in OPEN
            or (s.stage == "finish" and told_to_finish(s))]


def model(study: VerticalStudy) -> dict[str, Any]:
    """The final model as the coordinator may see it: each party's coefficients only if
    the study released them, and the intercept as the sum of the released shares."""
    out: dict[str, Any] = {"released": study.release_coefficients, "parties": {}}
    intercept, complete = 0.0, True
    for spoke in parties(study):
        final = study.final.get(spoke)
        coefficients = final.get("coefficients") if final else None
        out["parties"][spoke] = coefficients
        if final and final.get("intercept") is not None:
            intercept += final["intercept"]
        else:
            complete = False
    out["intercept"] = intercept if complete else None
    return out
