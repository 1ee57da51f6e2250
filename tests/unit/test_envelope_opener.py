"""Opening spoke messages in worker processes (``tributary.hub.opening``): the same verdicts
as in the calling thread for genuine, forged, malformed and unknown-key messages; custody
records checked there are taken by ingest only while every key they were checked against
is still the spoke's; a worker that dies costs a retry here, nothing else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from child_processes import alive
from signed_results import DIGEST, Spokes, audited_hub, study_of
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from tributary.hub.models import CaseResult, CaseState, SpokeKey
from tributary.hub.opening import EnvelopeOpener, Opened, open_batch
from tributary.hub.services.ingest import Rejected, ingest_batch
from tributary.protocol.messages import CaseStatus, ProtocolError, ResultMessage
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal

CASES = [f"c{i}" for i in range(4)]


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return audited_hub(tmp_path)


@pytest.fixture
def spokes(engine: Engine) -> Spokes:
    return study_of(engine, ["north", "south"], ["north", "south"], CASES)


@pytest.fixture
def opener() -> EnvelopeOpener:
    opener = EnvelopeOpener(2)
    yield opener
    opener.close()


def result(spokes: Spokes, spoke: str, case: str) -> ResultMessage:
    return spokes.sign(ResultMessage(
        experiment_id="exp", spoke_id=spoke, case_id=case, status=CaseStatus.SUCCEEDED,
        output={"volume": 1.0}, image_digest=DIGEST, finished_at=datetime.now(UTC)))


def key_table(spokes: Spokes) -> dict[str, tuple[str, str]]:
    return {key.keyid: (spoke, key.public.pem) for spoke, key in spokes.keys.items()}


def verdicts(opened: list[Opened | ProtocolError]) -> list[object]:
    return [(type(item).__name__, str(item)) if isinstance(item, ProtocolError)
            else (item.message, item.custody) for item in opened]


def test_workers_give_the_verdicts_of_the_calling_thread(
        spokes: Spokes, opener: EnvelopeOpener) -> None:
    genuine = [result(spokes, spoke, case) for case in CASES for spoke in ("north", "south")]
    bodies = [seal(m, spokes.keys[m.spoke_id]) for m in genuine]
    forged = bodies[0].replace('"sig": "', '"sig": "AAAA', 1)
    stranger = SigningKey.generate()
    unknown = seal(genuine[1], stranger)
    altered = genuine[2].model_copy(update={"output": {"volume": 2.0}})  # after custody
    hostile = ["", "[" * 100_000, '{"payload": 1}', forged, unknown,
               seal(altered, spokes.keys["north"]), "x" * 2_000_000]
    batch = bodies + hostile
    here = open_batch(batch, key_table(spokes))
    there = opener.submit(batch, key_table(spokes)).result()
    assert verdicts(there) == verdicts(here)
    assert all(isinstance(item, Opened) and item.custody is not None
               for item in there[:len(bodies)])
    assert [m.message for m in there[:len(bodies)]] == genuine  # type: ignore[union-attr]
    assert all(isinstance(item, ProtocolError) for item in there[len(bodies):-2])
    # A custody record that does not verify: opened, but left for ingest to check again.
    altered_opened = there[-2]
    assert isinstance(altered_opened, Opened) and altered_opened.custody is None
    assert isinstance(there[-1], ProtocolError)


def test_ingest_takes_a_record_checked_elsewhere_only_while_its_keys_are_active(
        engine: Engine, spokes: Spokes, opener: EnvelopeOpener) -> None:
    messages = [result(spokes, "north", case) for case in CASES]
    bodies = [seal(m, spokes.keys["north"]) for m in messages]
    opened = opener.submit(bodies, key_table(spokes)).result()
    assert opener.pids()  # opened by a worker
    assert all(isinstance(item, Opened) and item.custody for item in opened)
    first, second = opened[:2]
    assert isinstance(first, Opened) and isinstance(second, Opened)
    with Session(engine) as session:
        assert ingest_batch(session, [first.message], [first.custody]) == [True]
    # The spoke's key is revoked between opening and storing: checked again, refused.
    with Session(engine) as session:
        row = session.exec(select(SpokeKey).where(SpokeKey.spoke_id == "north")).one()
        row.revoked_at = datetime.now(UTC)
        session.add(row)
        session.commit()
    with Session(engine) as session:
        [outcome] = ingest_batch(session, [second.message], [second.custody])
    assert isinstance(outcome, Rejected) and "custody record refused" in str(outcome)
    with Session(engine) as session:
        states = {r.case_id: r.state for r in session.exec(select(CaseResult).where(
            CaseResult.spoke_id == "north"))}
    assert states["c0"] == CaseState.SUCCEEDED and states["c1"] == CaseState.QUEUED


def test_a_worker_that_dies_costs_a_retry_here(spokes: Spokes, opener: EnvelopeOpener) -> None:
    messages = [result(spokes, "south", case) for case in CASES]
    bodies = [seal(m, spokes.keys["south"]) for m in messages]
    assert len(opener.submit(bodies, key_table(spokes)).result()) == len(bodies)
    workers = opener.pids()
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    pending = opener.submit(bodies, key_table(spokes))
    assert [item.message for item in pending.result()] == messages  # type: ignore[union-attr]
    # And the next batch goes to a new pool of workers.
    again = opener.submit(bodies, key_table(spokes)).result()
    assert [item.message for item in again] == messages  # type: ignore[union-attr]
    assert opener.pids() and not set(opener.pids()) & set(workers)


def test_a_few_messages_are_opened_here(spokes: Spokes, opener: EnvelopeOpener) -> None:
    """A heartbeat or a status alone is opened in the calling thread, as it would be
    there: no worker starts for it; a batch of INLINE_BELOW messages goes to one."""
    messages = [result(spokes, "north", case) for case in CASES]
    bodies = [seal(m, spokes.keys["north"]) for m in messages]
    few = [*bodies[:opener.INLINE_BELOW - 2], "{}"]  # one fewer than INLINE_BELOW
    assert verdicts(opener.submit(few, key_table(spokes)).result()) == \
        verdicts(open_batch(few, key_table(spokes)))
    assert opener.pids() == []
    assert len(opener.submit(bodies[:opener.INLINE_BELOW], key_table(spokes)).result()) == \
        opener.INLINE_BELOW
    assert opener.pids()


PARENT = """
import sys, time
from tributary.hub.opening import EnvelopeOpener
if __name__ == "__main__":
    opener = EnvelopeOpener(1)
    opener.submit(["{}"] * opener.INLINE_BELOW, {}).result()
    print(*opener.pids(), flush=True)
    time.sleep(120)
"""


def test_workers_stop_when_their_hub_is_killed(tmp_path: Path) -> None:
    """A hub killed with SIGKILL cannot stop its verifying processes: they stop themselves
    (else every crash of a hub would leave a process behind)."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert workers and all(alive(pid) for pid in workers)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers)
    finally:
        parent.kill()

