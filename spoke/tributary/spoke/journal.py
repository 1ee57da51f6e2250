"""The spoke's durable journal (SQLite, WAL, synchronous=FULL): everything the spoke has
promised and not yet finished survives a crash, a kill -9 or a power cut.

- ``experiments``: every experiment message the spoke accepted from the broker. The broker
  message is acknowledged only after this row is committed, so nothing stays unacked while
  cases run for hours, and nothing acked is ever lost. An experiment the site's data
  steward must approve first waits as ``held`` (see :mod:`tributary.spoke.steward`); one
  whose cases all ran while some results still wait for the steward's review is
  ``reviewing``.
- ``cases``: one row per (experiment, case, attempt) with its state
  ``queued`` → ``running`` → ``done`` (or ``cancelled``, or ``held`` while its result waits
  for the steward's review). The primary key makes running the
  same attempt twice impossible; ``launches`` counts container starts, so a case that keeps
  taking the spoke down is given up after a bounded number of tries.
- ``batch_jobs``: the batch job (Slurm) each case attempt was submitted as: its name is
  journaled before the job is submitted and its id right after, so a spoke that restarts
  adopts the job it finds, queued, running or finished, and never submits a second one.
- ``results``: each finished case's result, signed into the custody ``chain``.
- ``count_requests``: count requests acknowledged but not yet answered. Answering one can
  mean ingesting new files first, which may take long; journaling it lets the broker
  deliver the next message (a cancellation, say) meanwhile, and an answer cut short by a
  crash is given after the restart.
- ``outbox``: every message the hub must receive, already sealed, in the order it must
  arrive. The sender thread publishes and marks rows; a row is sent again (same bytes,
  same ``message_id``) until the broker confirms it, and the hub ignores duplicates.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tributary.protocol.custody import record_hash
from tributary.protocol.messages import CountRequest, ExperimentMessage, ResultMessage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    experiment_id TEXT NOT NULL,
    case_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    message TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (experiment_id, case_id, attempt)
);
CREATE TABLE IF NOT EXISTS chain (
    sequence INTEGER PRIMARY KEY,
    record_sha256 TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked_digests (
    digest TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    revoked_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS handled_messages (
    message_id TEXT PRIMARY KEY,
    experiment_id TEXT NOT NULL,
    handled_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS experiments (
    experiment_id TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    message TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'received',
    reason TEXT,
    received_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS cases (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment_id TEXT NOT NULL,
    case_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    launches INTEGER NOT NULL DEFAULT 0,
    started_at TEXT,
    UNIQUE (experiment_id, case_id, attempt)
);
CREATE TABLE IF NOT EXISTS batch_jobs (
    experiment_id TEXT NOT NULL,
    case_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    job_name TEXT NOT NULL,
    job_id TEXT,
    recorded_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (experiment_id, case_id, attempt)
);
CREATE TABLE IF NOT EXISTS cancellations (
    experiment_id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    message_id TEXT NOT NULL,
    cancelled_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS released_cases (
    experiment_id TEXT NOT NULL,
    case_id TEXT NOT NULL,
    catalog_case_id TEXT NOT NULL,
    PRIMARY KEY (experiment_id, case_id)
);
CREATE TABLE IF NOT EXISTS count_requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    message TEXT NOT NULL,
    received_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    summary TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
);
"""

#: Experiment states (``held``: awaiting the data steward's approval; ``reviewing``: every
#: case ran, some results await the steward's review).
RECEIVED, ACCEPTED, REFUSED, COMPLETED, CANCELLED = (
    "received", "accepted", "refused", "completed", "cancelled")
HELD, REVIEWING = "held", "reviewing"
#: Case states (``held``, above, too: the case ran and its result awaits review).
QUEUED, RUNNING, DONE = "queued", "running", "done"


@dataclass(frozen=True)
class CaseRow:
    experiment_id: str
    case_id: str
    attempt: int
    state: str
    launches: int


@dataclass(frozen=True)
class OutboxRow:
    seq: int
    message_id: str
    kind: str
    body: str
    summary: dict[str, Any]


@dataclass(frozen=True)
class Outgoing:
    """A sealed message to put in the outbox, with what the audit log says about it."""

    message_id: str
    kind: str
    body: str
    summary: dict[str, Any]


class WorkDirBusy(RuntimeError):
    """Another spoke process already runs on this work folder."""


def claim_work_dir(work_dir: Path) -> int:
    """Take the work folder's exclusive lock for the life of this process (the kernel
    drops it when the process dies, even by kill -9). Two spoke processes on one journal
    would each think the other's running cases were interrupted and run them again."""
    work_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(work_dir / "spoke.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise WorkDirBusy(f"another spoke process (pid {holder}) is using {work_dir}; "
                          "stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def agent_pid(work_dir: Path) -> int | None:
    """The pid of the spoke process holding ``work_dir`` (0 if it did not say), or None
    when none does. Only tests the lock: nothing is written."""
    try:
        fd = os.open(work_dir / "spoke.lock", os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ExperimentProgress:
    experiment_id: str
    state: str
    reason: str | None
    received_at: str
    cases: dict[str, int]  # case state -> how many (every attempt counted)


@dataclass(frozen=True)
class JournalStatus:
    """What the spoke holds, for `tributary spoke status`."""

    experiments: dict[str, int]  # experiment state -> how many
    cases: dict[str, int]
    outbox_unsent: int
    oldest_unsent_at: str | None  # when the oldest message still waiting was written
    revoked_digests: int
    count_requests: int  # acknowledged, not yet answered
    open: list[ExperimentProgress]  # experiments not yet completed, refused or cancelled


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable step: all of it survives a crash, or none of it."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _one(self, sql: str, args: tuple = ()) -> Any:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def _all(self, sql: str, args: tuple = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- outbox ---------------------------------------------------------------------------
    @staticmethod
    def enqueue(db: sqlite3.Connection, outgoing: Outgoing) -> None:
        """Add a message to the outbox inside a :meth:`transaction`."""
        db.execute("INSERT OR IGNORE INTO outbox (message_id, kind, body, summary) "
                   "VALUES (?, ?, ?, ?)", (outgoing.message_id, outgoing.kind, outgoing.body,
                                           json.dumps(outgoing.summary, default=str)))

    def send_later(self, outgoing: Outgoing) -> None:
        """Queue ``outgoing`` on its own (a message that answers no journaled request)."""
        with self.transaction() as db:
            self.enqueue(db, outgoing)

    def outbox_pending(self, limit: int = 100) -> list[OutboxRow]:
        """Unsent messages, oldest first: the order they must reach the hub in."""
        rows = self._all("SELECT seq, message_id, kind, body, summary FROM outbox WHERE sent=0 "
                         "ORDER BY seq LIMIT ?", (limit,))
        return [OutboxRow(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def outbox_depth(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM outbox WHERE sent=0")[0])

    def mark_sent(self, seq: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE outbox SET sent=1 WHERE seq=?", (seq,))

    # -- experiments ------------------------------------------------------------------------
    def experiment(self, experiment_id: str) -> tuple[ExperimentMessage, str] | None:
        """The journaled experiment message and its state."""
        row = self._one("SELECT message, state FROM experiments WHERE experiment_id=?",
                        (experiment_id,))
        return (ExperimentMessage.model_validate_json(row[0]), row[1]) if row else None

    def add_experiment(self, message: ExperimentMessage, state: str = RECEIVED,
                       reason: str | None = None, outgoing: Outgoing | None = None) -> bool:
        """Journal a newly received experiment; False if it is already known."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO experiments (experiment_id, message_id, message, state, "
                "reason) VALUES (?, ?, ?, ?, ?)", (message.experiment_id, message.message_id,
                                                   message.model_dump_json(), state, reason))
            db.execute("INSERT OR IGNORE INTO handled_messages (message_id, experiment_id) "
                       "VALUES (?, ?)", (message.message_id, message.experiment_id))
            if cursor.rowcount and outgoing is not None:
                self.enqueue(db, outgoing)
            return cursor.rowcount == 1

    def experiments_in(self, state: str) -> list[ExperimentMessage]:
        rows = self._all("SELECT message FROM experiments WHERE state=? ORDER BY rowid",
                         (state,))
        return [ExperimentMessage.model_validate_json(r[0]) for r in rows]

    def settle_experiment(self, experiment_id: str, state: str, reason: str | None,
                          outgoing: Outgoing | None, case_ids: list[str] = (),
                          expect: str | None = None) -> bool:
        """Move an experiment on (accepted with its queued cases, refused, completed,
        cancelled) together with the status message that tells the hub. With ``expect``,
        only from that state (False, and nothing done, if it has moved meanwhile)."""
        with self.transaction() as db:
            if expect is not None:
                row = db.execute("SELECT state FROM experiments WHERE experiment_id=?",
                                 (experiment_id,)).fetchone()
                if row is None or row[0] != expect:
                    return False
            db.execute("UPDATE experiments SET state=?, reason=? WHERE experiment_id=?",
                       (state, reason, experiment_id))
            db.executemany("INSERT OR IGNORE INTO cases (experiment_id, case_id, attempt) "
                           "VALUES (?, ?, 1)", [(experiment_id, c) for c in case_ids])
            if outgoing is not None:
                self.enqueue(db, outgoing)
            return True

    # -- cancellation ------------------------------------------------------------------------
    def cancellation(self, experiment_id: str) -> str | None:
        row = self._one("SELECT reason FROM cancellations WHERE experiment_id=?",
                        (experiment_id,))
        return row[0] if row else None

    def cancel(self, experiment_id: str, reason: str, message_id: str) -> list[str]:
        """Record the cancellation (even before the experiment arrives) and drop its queued
        cases, and those whose result still waits for the steward's review (it never
        leaves now); returns the dropped case ids."""
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO cancellations (experiment_id, reason, message_id) "
                       "VALUES (?, ?, ?)", (experiment_id, reason, message_id))
            dropped = [r[0] for r in db.execute(
                "SELECT case_id FROM cases WHERE experiment_id=? AND state IN (?, ?)",
                (experiment_id, QUEUED, HELD)).fetchall()]
            db.execute("UPDATE cases SET state=? WHERE experiment_id=? AND state IN (?, ?)",
                       (CANCELLED, experiment_id, QUEUED, HELD))
            return dropped

    # -- the data steward's gates ------------------------------------------------------------
    def release_held(self, experiment_id: str, message: ExperimentMessage) -> bool:
        """The steward approved a held experiment: it becomes ``received`` (the dispatcher
        prepares it next) with ``message``, the copy re-verified from its signed envelope.
        False if it is no longer held (cancelled meanwhile)."""
        with self.transaction() as db:
            cursor = db.execute("UPDATE experiments SET state=?, message=?, reason=NULL "
                                "WHERE experiment_id=? AND state=?",
                                (RECEIVED, message.model_dump_json(), experiment_id, HELD))
            return cursor.rowcount == 1

    def hold_case(self, row: CaseRow) -> None:
        """A claimed case ran and its result now waits for the steward's review: it is not
        queued again, even after a restart."""
        with self.transaction() as db:
            db.execute("UPDATE cases SET state=? WHERE experiment_id=? AND case_id=? AND "
                       "attempt=? AND state=?", (HELD, row.experiment_id, row.case_id,
                                                 row.attempt, RUNNING))

    # -- cases -------------------------------------------------------------------------------
    def record_released(self, experiment_id: str, mapping: dict[str, str]) -> None:
        """Keep which catalog case each released id of ``experiment_id`` stands for
        (released id -> catalog case id); it never leaves the spoke."""
        with self.transaction() as db:
            db.executemany("INSERT OR IGNORE INTO released_cases (experiment_id, case_id, "
                           "catalog_case_id) VALUES (?, ?, ?)",
                           [(experiment_id, r, c) for r, c in mapping.items()])

    def released_cases(self, experiment_id: str) -> dict[str, str]:
        """Released id -> catalog case id for one experiment."""
        return dict(self._all("SELECT case_id, catalog_case_id FROM released_cases WHERE "
                              "experiment_id=?", (experiment_id,)))

    def cases(self, experiment_id: str) -> list[CaseRow]:
        rows = self._all("SELECT experiment_id, case_id, attempt, state, launches FROM cases "
                         "WHERE experiment_id=? ORDER BY seq", (experiment_id,))
        return [CaseRow(*r) for r in rows]

    def queue_depth(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM cases WHERE state=?", (QUEUED,))[0])

    def claim_next(self) -> CaseRow | None:
        """Take the oldest queued case and mark it running, atomically: no case is ever
        handed to two workers."""
        with self.transaction() as db:
            row = db.execute(
                "SELECT seq, experiment_id, case_id, attempt, launches FROM cases "
                "WHERE state=? ORDER BY seq LIMIT 1", (QUEUED,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE cases SET state=?, launches=launches+1, "
                       "started_at=CURRENT_TIMESTAMP WHERE seq=?", (RUNNING, row[0]))
            return CaseRow(row[1], row[2], row[3], RUNNING, row[4] + 1)

    def drop_case(self, row: CaseRow) -> None:
        """A claimed case that must not run (its experiment was cancelled)."""
        with self.transaction() as db:
            db.execute("UPDATE cases SET state=? WHERE experiment_id=? AND case_id=? AND "
                       "attempt=?", (CANCELLED, row.experiment_id, row.case_id, row.attempt))

    def release_case(self, row: CaseRow) -> None:
        """A case stopped because the spoke itself is stopping: back to the queue, and the
        launch does not count against it."""
        with self.transaction() as db:
            db.execute("UPDATE cases SET state=?, launches=MAX(launches-1, 0) WHERE "
                       "experiment_id=? AND case_id=? AND attempt=? AND state=?",
                       (QUEUED, row.experiment_id, row.case_id, row.attempt, RUNNING))

    def requeue_interrupted(self) -> list[CaseRow]:
        """After a restart: cases that were running when the spoke went away go back to
        the queue (their launch count kept). Returns them."""
        with self.transaction() as db:
            rows = db.execute("SELECT experiment_id, case_id, attempt, state, launches "
                              "FROM cases WHERE state=? ORDER BY seq", (RUNNING,)).fetchall()
            db.execute("UPDATE cases SET state=? WHERE state=?", (QUEUED, RUNNING))
        return [CaseRow(*r) for r in rows]

    # -- batch jobs -------------------------------------------------------------------------
    def job_intent(self, row_key: tuple[str, str, int], job_name: str) -> None:
        """About to submit the batch job ``job_name`` for (experiment, case, attempt)."""
        with self.transaction() as db:
            db.execute("INSERT INTO batch_jobs (experiment_id, case_id, attempt, job_name) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET job_name=excluded."
                       "job_name, job_id=NULL", (*row_key, job_name))

    def job_submitted(self, row_key: tuple[str, str, int], job_id: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE batch_jobs SET job_id=? WHERE experiment_id=? AND case_id=? "
                       "AND attempt=?", (job_id, *row_key))

    def job(self, row_key: tuple[str, str, int]) -> tuple[str, str | None] | None:
        """(job name, job id or None if its submission was not confirmed) of a case."""
        row = self._one("SELECT job_name, job_id FROM batch_jobs WHERE experiment_id=? AND "
                        "case_id=? AND attempt=?", row_key)
        return None if row is None else (row[0], row[1])

    def jobs_to_stop(self) -> list[tuple[tuple[str, str, int], str, str | None]]:
        """((experiment, case, attempt), job name, job id) of every journaled job whose
        case no longer wants it: the case was dropped (its experiment cancelled), or its
        experiment was cancelled while it was queued or running. Those still in the
        cluster are cancelled, then forgotten (:meth:`forget_job`)."""
        rows = self._all(
            "SELECT j.experiment_id, j.case_id, j.attempt, j.job_name, j.job_id FROM "
            "batch_jobs j JOIN cases c ON c.experiment_id=j.experiment_id AND "
            "c.case_id=j.case_id AND c.attempt=j.attempt WHERE c.state=? OR (c.state IN "
            "(?, ?) AND j.experiment_id IN (SELECT experiment_id FROM cancellations))",
            (CANCELLED, QUEUED, RUNNING))
        return [((r[0], r[1], r[2]), r[3], r[4]) for r in rows]

    def forget_job(self, row_key: tuple[str, str, int]) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM batch_jobs WHERE experiment_id=? AND case_id=? AND "
                       "attempt=?", row_key)

    def add_retry(self, experiment_id: str, case_ids: list[str],
                  attempt: int) -> tuple[list[str], dict[str, str]]:
        """Queue ``attempt`` of each named case whose latest result failed with a lower
        attempt. Returns (queued, {case: why not}); a redelivered retry queues nothing new
        and refuses nothing it queued before."""
        queued: list[str] = []
        refused: dict[str, str] = {}
        with self.transaction() as db:
            for case_id in dict.fromkeys(case_ids):
                rows = db.execute("SELECT attempt, state FROM cases WHERE experiment_id=? "
                                  "AND case_id=? ORDER BY attempt DESC",
                                  (experiment_id, case_id)).fetchall()
                if not rows:
                    refused[case_id] = "not a case of this experiment at this spoke"
                    continue
                latest, state = rows[0]
                if latest == attempt:
                    continue  # this retry was received before
                if latest > attempt:
                    refused[case_id] = f"attempt {latest} already exists"
                    continue
                if state != DONE:
                    refused[case_id] = f"attempt {latest} is {state}, not finished"
                    continue
                result = db.execute("SELECT message FROM results WHERE experiment_id=? AND "
                                    "case_id=? AND attempt=?",
                                    (experiment_id, case_id, latest)).fetchone()
                if result is None or ResultMessage.model_validate_json(
                        result[0]).status != "failed":
                    refused[case_id] = f"attempt {latest} succeeded; only failed cases re-run"
                    continue
                db.execute("INSERT INTO cases (experiment_id, case_id, attempt) "
                           "VALUES (?, ?, ?)", (experiment_id, case_id, attempt))
                queued.append(case_id)
            if queued:
                db.execute("UPDATE experiments SET state=? WHERE experiment_id=?",
                           (ACCEPTED, experiment_id))
        return queued, refused

    def unfinished(self, experiment_id: str) -> int:
        return int(self._one("SELECT COUNT(*) FROM cases WHERE experiment_id=? AND state IN "
                             "(?, ?)", (experiment_id, QUEUED, RUNNING))[0])

    # -- results and custody chain ---------------------------------------------------------
    def result(self, experiment_id: str, case_id: str, attempt: int = 1) -> ResultMessage | None:
        row = self._one(
            "SELECT message FROM results WHERE experiment_id=? AND case_id=? AND attempt=?",
            (experiment_id, case_id, attempt))
        return ResultMessage.model_validate_json(row[0]) if row else None

    def chain_head(self) -> tuple[int, str | None]:
        """(last sequence, its record hash) of this spoke's custody chain."""
        row = self._one("SELECT sequence, record_sha256 FROM chain ORDER BY sequence DESC "
                        "LIMIT 1")
        return (row[0], row[1]) if row else (0, None)

    def record(self, message: ResultMessage, sequence: int | None = None,
               record_sha256: str | None = None, outgoing: Outgoing | None = None) -> None:
        """Store a result, finish its case, advance the custody chain and queue the sealed
        result for the hub: one transaction, so a crash leaves all of it or none."""
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO results (experiment_id, case_id, attempt, message, "
                "published) VALUES (?, ?, ?, ?, 1)",
                (message.experiment_id, message.case_id, message.attempt,
                 message.model_dump_json()))
            db.execute("INSERT OR IGNORE INTO cases (experiment_id, case_id, attempt) "
                       "VALUES (?, ?, ?)", (message.experiment_id, message.case_id,
                                            message.attempt))
            db.execute("UPDATE cases SET state=? WHERE experiment_id=? AND case_id=? AND "
                       "attempt=?", (DONE, message.experiment_id, message.case_id,
                                     message.attempt))
            if sequence is not None:
                db.execute("INSERT INTO chain (sequence, record_sha256) VALUES (?, ?)",
                           (sequence, record_sha256))
            if outgoing is not None:
                self.enqueue(db, outgoing)

    def resend_from(self, sequence: int) -> tuple[int, list[ResultMessage]]:
        """The hub never received the custody records from ``sequence`` on: mark their
        results unsent again in the outbox (the same sealed bytes and message ids, in chain
        order, ahead of anything newer). Returns how many were marked, and the results with
        such a record but no outbox row (journaled before the outbox), to queue anew."""
        with self.transaction() as db:
            wanted = {row[1]: row[0] for row in db.execute(
                "SELECT sequence, record_sha256 FROM chain WHERE sequence >= ?", (sequence,))}
            if not wanted:
                return 0, []
            found: list[tuple[int, ResultMessage]] = []
            for (body,) in db.execute("SELECT message FROM results").fetchall():
                result = ResultMessage.model_validate_json(body)
                if result.custody and (seq := wanted.get(record_hash(result.custody))):
                    found.append((seq, result))
            marked, orphans = 0, []
            for _, result in sorted(found, key=lambda item: item[0]):
                if db.execute("UPDATE outbox SET sent=0 WHERE message_id=?",
                              (result.message_id,)).rowcount:
                    marked += 1
                else:
                    orphans.append(result)
            return marked, orphans

    def legacy_unpublished(self) -> list[ResultMessage]:
        """Results an older spoke journaled but never published (before the outbox)."""
        rows = self._all("SELECT message FROM results WHERE published=0 ORDER BY rowid")
        return [ResultMessage.model_validate_json(r[0]) for r in rows]

    def mark_legacy_queued(self, message: ResultMessage, outgoing: Outgoing) -> None:
        with self.transaction() as db:
            self.enqueue(db, outgoing)
            db.execute("UPDATE results SET published=1 WHERE experiment_id=? AND case_id=? "
                       "AND attempt=?", (message.experiment_id, message.case_id,
                                         message.attempt))

    # -- approvals and replays ---------------------------------------------------------------
    def revoke(self, digest: str, reason: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO revoked_digests (digest, reason) VALUES (?, ?)",
                       (digest, reason))

    def revocation(self, digest: str) -> str | None:
        """Why ``digest``'s approval was revoked, or None if it was not."""
        row = self._one("SELECT reason FROM revoked_digests WHERE digest=?", (digest,))
        return row[0] if row else None

    def handled(self, message_id: str) -> bool:
        return self._one("SELECT 1 FROM handled_messages WHERE message_id=?",
                         (message_id,)) is not None

    # -- count requests ---------------------------------------------------------------------
    def add_count_request(self, request: CountRequest) -> bool:
        """Journal a count request to answer; False if it was answered or journaled before
        (a redelivery)."""
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM handled_messages WHERE message_id=?",
                          (request.message_id,)).fetchone() is not None:
                return False
            return db.execute("INSERT OR IGNORE INTO count_requests (message_id, message) "
                              "VALUES (?, ?)", (request.message_id,
                                                request.model_dump_json())).rowcount == 1

    def count_requests(self) -> list[CountRequest]:
        """Count requests still to answer, oldest first."""
        return [CountRequest.model_validate_json(row[0]) for row in
                self._all("SELECT message FROM count_requests ORDER BY seq")]

    def answer_count(self, request: CountRequest, reply: Outgoing) -> None:
        """Queue the reply and retire the request, in one transaction."""
        with self.transaction() as db:
            self.enqueue(db, reply)
            db.execute("INSERT OR IGNORE INTO handled_messages (message_id, experiment_id) "
                       "VALUES (?, ?)", (request.message_id, request.query_id))
            db.execute("DELETE FROM count_requests WHERE message_id=?", (request.message_id,))

    def mark_handled(self, message_id: str, experiment_id: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO handled_messages (message_id, experiment_id) "
                       "VALUES (?, ?)", (message_id, experiment_id))

    # -- overview -------------------------------------------------------------------------
    def status(self) -> JournalStatus:
        def tally(sql: str, args: tuple = ()) -> dict[str, int]:
            return {state: count for state, count in self._all(sql, args)}

        finished = (COMPLETED, REFUSED, CANCELLED)
        open_rows = self._all(
            "SELECT experiment_id, state, reason, received_at FROM experiments WHERE state "
            "NOT IN (?, ?, ?) ORDER BY rowid", finished)
        unsent = self._one("SELECT COUNT(*), MIN(created_at) FROM outbox WHERE sent=0")
        return JournalStatus(
            experiments=tally("SELECT state, COUNT(*) FROM experiments GROUP BY state"),
            cases=tally("SELECT state, COUNT(*) FROM cases GROUP BY state"),
            outbox_unsent=int(unsent[0]), oldest_unsent_at=unsent[1],
            revoked_digests=int(self._one("SELECT COUNT(*) FROM revoked_digests")[0]),
            count_requests=int(self._one("SELECT COUNT(*) FROM count_requests")[0]),
            open=[ExperimentProgress(row[0], row[1], row[2], row[3], tally(
                "SELECT state, COUNT(*) FROM cases WHERE experiment_id=? GROUP BY state",
                (row[0],))) for row in open_rows])

    def close(self) -> None:
        with self._lock:
            self._db.close()
