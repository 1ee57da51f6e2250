"""Hub side of audit log anchors: a spoke's head from its heartbeats only moves forward, a
head that goes backwards (a log cut or recreated) is kept out and recorded once, and the
hub's own head is its newest audit row's entry in its forensic log."""
# ruff: noqa: F811 - the fixtures ``keys`` and ``session`` are from signed_results

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from signed_results import keys, session  # noqa: F401 - fixtures
from sqlmodel import Session, select

from tributary.hub.models import AuditEvent, Spoke
from tributary.hub.services import audit
from tributary.hub.services.anchors import anchors
from tributary.hub.services.ingest import ingest
from tributary.protocol.auditlog import AuditHead, AuditLog, verify_log
from tributary.protocol.messages import HeartbeatMessage

START = datetime.now(UTC)


def beat(n: int, head: AuditHead | None) -> HeartbeatMessage:
    return HeartbeatMessage(spoke_id="site-a", spoke_version="9.9", concurrency=1,
                            queue_depth=0, interval_seconds=5, audit_head=head,
                            sent_at=START + timedelta(seconds=n))


def head(seq: int, fill: str) -> AuditHead:
    return AuditHead(seq=seq, hash=fill * 64)


def regressions(session: Session) -> list[AuditEvent]:
    return list(session.exec(select(AuditEvent).where(
        AuditEvent.action == "spoke.audit_log_regressed")))


def test_a_spoke_head_only_moves_forward_and_a_regression_is_recorded_once(
        session: Session) -> None:
    assert ingest(session, beat(1, head(5, "a")))
    assert ingest(session, beat(2, None))  # an older spoke, or an unreadable log
    assert anchors(session).spokes["site-a"] == head(5, "a")
    assert ingest(session, beat(3, head(7, "b")))
    assert anchors(session).spokes["site-a"] == head(7, "b")
    # the log was deleted and started again: seq 2 of another log
    for n in (4, 5):
        assert ingest(session, beat(n, head(2, "c")))
    assert anchors(session).spokes["site-a"] == head(7, "b")
    (event,) = regressions(session)
    assert event.target == "site-a"
    assert (event.detail["anchored_seq"], event.detail["reported_seq"]) == (7, 2)
    # the recreated log grows back towards the anchor: not recorded again
    assert ingest(session, beat(6, head(3, "e")))
    assert len(regressions(session)) == 1
    # the same seq with another hash: the log was rewritten
    assert ingest(session, beat(7, head(7, "d")))
    assert len(regressions(session)) == 2
    assert session.get(Spoke, "site-a").audit_head_hash == "b" * 64


def test_the_hub_head_is_its_newest_rows_log_entry(session: Session, tmp_path: Path) -> None:
    for n in range(3):
        audit.record(session, "tester", "thing.done", str(n))
    session.commit()
    held = anchors(session).hub
    log = Path(str(session.get_bind().engine.url.database)).with_name("hub-audit.jsonl")
    assert held == AuditLog(log).head()
    assert verify_log(log, (held.seq, held.hash)).ok
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))
    assert verify_log(cut).ok  # the chain alone cannot tell
    assert not verify_log(cut, (held.seq, held.hash)).ok


def test_a_hub_log_cut_or_recreated_is_recorded_when_the_hub_starts(session: Session) -> None:
    from tributary.hub.services.anchors import check_hub_log
    from tributary.hub.services.audit import attach_forensic_log

    for n in range(3):
        audit.record(session, "tester", "thing.done", str(n))
    session.commit()
    held = anchors(session).hub
    engine = session.get_bind().engine
    path = Path(str(engine.url.database)).with_name("hub-audit.jsonl")
    assert check_hub_log(session, attach_forensic_log(engine, path)) is None
    path.unlink()  # deleted; the restarted hub begins a new one
    log = attach_forensic_log(engine, path)
    log.append("hub", "hub.started")
    problem = check_hub_log(session, log)
    assert problem is not None and f"anchored head seq {held.seq}" in problem
    session.commit()
    (event,) = session.exec(select(AuditEvent).where(
        AuditEvent.action == "hub.audit_log_regressed")).all()
    assert (event.detail["anchored_seq"], event.detail["log_seq"]) == (held.seq, 1)


def test_a_hostile_head_in_a_heartbeat_is_refused_by_the_schema() -> None:
    import pytest
    from pydantic import ValidationError

    for bad in ({"seq": -1, "hash": "a" * 64}, {"seq": 2**31, "hash": "a" * 64},
                {"seq": 1, "hash": "A" * 64}, {"seq": 1, "hash": "a" * 63},
                {"seq": 1, "hash": "a" * 64, "extra": 1}):
        with pytest.raises(ValidationError):
            HeartbeatMessage.model_validate({**beat(1, None).model_dump(mode="json"),
                                             "audit_head": bad})


def test_audit_verify_refuses_unusable_anchors(tmp_path: Path) -> None:
    import subprocess
    import sys

    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("someone", "thing.done")
    saved = tmp_path / "anchors.json"
    cases = {"not json": "{", "too big": " " * (4 * 1024 * 1024 + 1),
             "no such source": '{"hub": null, "spokes": {}}'}
    for what, text in cases.items():
        saved.write_text(text)
        done = subprocess.run([sys.executable, "-m", "tributary.cli", "audit", "verify",
                               str(log.path), "--anchors", str(saved)],
                              capture_output=True, text=True)
        assert done.returncode == 1, what
        assert "Traceback" not in done.stderr, done.stderr
    saved.write_text(json.dumps({"hub": log.head().model_dump()}))
    done = subprocess.run([sys.executable, "-m", "tributary.cli", "audit", "verify",
                           str(log.path), "--anchors", str(saved)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "anchored head seq 1 present" in " ".join(done.stdout.split())
