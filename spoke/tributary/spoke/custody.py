"""The spoke's side of the chain of custody: every result is signed into a per-spoke hash
chain, journaled, and published in chain order through the journal's outbox, so the hub
can check continuity."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tributary.protocol.custody import GENESIS, CustodyRecord, record_hash, sign_custody
from tributary.protocol.messages import ResultMessage
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import seal
from tributary.spoke import __version__
from tributary.spoke.journal import Journal, Outgoing


def input_digest(deidentified: dict[str, Path]) -> str:
    """Hash of the de-identified input set: every file of every series, in a fixed order."""
    outer = hashlib.sha256()
    for series_id in sorted(deidentified):
        for path in sorted(p for p in deidentified[series_id].iterdir() if p.suffix == ".dcm"):
            outer.update(f"{series_id}/{path.name}\0".encode())
            outer.update(hashlib.sha256(path.read_bytes()).digest())
    return outer.hexdigest()


class CustodyChain:
    """Appends signed records under one lock. Each record is journaled together with its
    sealed result in the outbox, in one transaction, so results leave in chain order even
    across broker outages and restarts."""

    def __init__(self, journal: Journal, key: SigningKey) -> None:
        self.journal = journal
        self.key = key
        self._lock = threading.Lock()

    def append(self, result: ResultMessage, run: dict[str, Any]) -> ResultMessage:
        with self._lock:
            sequence, previous = self.journal.chain_head()
            record = CustodyRecord(
                experiment_id=result.experiment_id, spoke_id=result.spoke_id,
                case_id=result.case_id, attempt=result.attempt, sequence=sequence + 1,
                previous_record_sha256=previous or GENESIS, image_digest=result.image_digest,
                participant_sha256=run.get("participant_sha256"),
                input_sha256=run.get("input_sha256"), deid_profile=run.get("deid_profile"),
                spoke_version=__version__, started_at=result.started_at,
                finished_at=result.finished_at, status=result.status.value,
                exit_code=run.get("exit_code"),
                failure_reason=result.failure.reason.value if result.failure else None,
            )
            envelope = sign_custody(self.key, record, result)
            signed = result.model_copy(update={"custody": envelope})
            self.journal.record(signed, sequence + 1, record_hash(envelope),
                                outgoing(signed, self.key))
            return signed


def outgoing(message: BaseModel, key: SigningKey) -> Outgoing:
    """A message sealed for the outbox, with the facts the audit log records when it goes."""
    summary = {name: getattr(message, name) for name in
               ("experiment_id", "query_id", "psi_id", "case_id", "attempt", "status",
                "state", "reason")
               if getattr(message, name, None) is not None}
    return Outgoing(message.message_id, message.kind, seal(message, key), summary)
