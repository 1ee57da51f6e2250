"""Opening what spokes send, on other cores than the one that stores it.

Most of what an ingested result costs the hub's CPU is checking it: parsing the envelope,
validating the message, and two Ed25519 signatures (the envelope's and the custody
record's). Those checks need no database, so the results consumer hands a batch's bodies
to worker processes (:class:`EnvelopeOpener`, ``results_verify_processes``) and stores the
previous batch meanwhile; the signature library holds the interpreter lock, so threads
would not run them beside the storing thread.

A worker checks the custody record's signature against the keys its spoke had when the
batch was taken (:class:`VerifiedCustody` names them). Whether those keys are still the
spoke's is decided when the result is stored, in the storing transaction: a key revoked in
between sends the record back to be checked again there, and refused. Nothing the worker
says is taken on trust beyond its signature checks, which are the same code as before.

Workers are fresh interpreters (``spawn``: the hub process has threads, which a fork would
copy in whatever state they were). A worker that dies costs the batch a retry in the
calling thread; the pool is started again for the next one."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.process
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from tributary.protocol.custody import CustodyRecord, verify_custody
from tributary.protocol.messages import ProtocolError, ResultMessage
from tributary.protocol.signing import PublicKey
from tributary.protocol.wire import SpokeMessage, open_from_spoke

log = logging.getLogger(__name__)

#: The enrolled keys a batch's envelopes may be checked against: key id -> (spoke, PEM).
KeyTable = Mapping[str, tuple[str, str]]


@dataclass(frozen=True)
class VerifiedCustody:
    """A result's custody record whose signature, subject and fields were checked against
    ``keyids`` (the spoke's active keys when its batch was taken; one of them signed it)."""

    record: CustodyRecord
    keyids: frozenset[str]


@dataclass(frozen=True)
class Opened:
    """A verified message, and its custody record if it is a result that carries one whose
    check passed (otherwise ingest checks it again, and says why it is refused)."""

    message: SpokeMessage
    custody: VerifiedCustody | None = None


_parsed: dict[str, PublicKey] = {}


def _key(pem: str) -> PublicKey:
    """Parsing a PEM costs more than checking a signature: once per process and key."""
    key = _parsed.get(pem)
    if key is None:
        if len(_parsed) > 8192:
            _parsed.clear()
        key = _parsed[pem] = PublicKey.from_pem(pem)
    return key


def _exit_with(parent: int) -> None:
    """A worker whose parent dies (killed, say) is not told to stop: it stops itself."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def open_batch(bodies: Sequence[str], keys: KeyTable) -> list[Opened | ProtocolError]:
    """Open each body (:func:`~tributary.protocol.wire.open_from_spoke`) with the keys of
    ``keys``, and check each result's custody record against its spoke's keys there.
    What a worker process runs; the calling thread runs it too when there is none."""
    by_keyid = {keyid: (spoke, _key(pem)) for keyid, (spoke, pem) in keys.items()}
    by_spoke: dict[str, list[tuple[str, PublicKey]]] = {}
    for keyid, (spoke, key) in by_keyid.items():
        by_spoke.setdefault(spoke, []).append((keyid, key))
    opened: list[Opened | ProtocolError] = []
    for body in bodies:
        try:
            message, _keyid = open_from_spoke(body, by_keyid.get)
        except ProtocolError as exc:
            opened.append(exc)
            continue
        custody = None
        if isinstance(message, ResultMessage) and message.custody is not None:
            spoke_keys = by_spoke.get(message.spoke_id, [])
            try:
                record = verify_custody(message.custody, [k for _, k in spoke_keys], message)
                custody = VerifiedCustody(record, frozenset(i for i, _ in spoke_keys))
            except Exception:  # ingest checks it again, and says why it is refused
                custody = None
        opened.append(Opened(message, custody))
    return opened


class PendingBatch:
    """A batch being opened: :meth:`result` waits for it."""

    def __init__(self, opener: EnvelopeOpener, bodies: Sequence[str], keys: KeyTable,
                 futures: list[Future[list[Opened | ProtocolError]]] | None) -> None:
        self._opener, self._bodies, self._keys, self._futures = opener, bodies, keys, futures
        self._done: list[Opened | ProtocolError] | None = (
            None if futures is not None else open_batch(bodies, keys))

    def result(self) -> list[Opened | ProtocolError]:
        if self._done is None:
            assert self._futures is not None
            try:
                self._done = [item for future in self._futures for item in future.result()]
            except BrokenProcessPool:
                log.warning("a verifying process died: opening %d message(s) here",
                            len(self._bodies))
                self._opener.restart()
                self._done = open_batch(self._bodies, self._keys)
        return self._done


class _SpawnContext(multiprocessing.context.SpawnContext):
    """The ``spawn`` context, keeping the processes an executor starts through it (the
    executor lists its workers nowhere public)."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[multiprocessing.process.BaseProcess] = []

    def Process(self, *args: Any, **kwargs: Any) -> multiprocessing.process.BaseProcess:
        """What the executor calls to make each worker (the contexts' own name)."""
        process = super().Process(*args, **kwargs)
        self.started.append(process)
        return process


class EnvelopeOpener:
    """Opens batches of spoke messages in ``processes`` worker processes (0: in the
    calling thread). :meth:`submit` returns at once; the batch is opened meanwhile (a
    batch of fewer than :data:`INLINE_BELOW` messages is opened by ``submit`` itself)."""

    #: Fewer messages than this are opened by one process (a chunk must pay its transfer).
    CHUNK = 25
    #: Fewer messages than this are opened in the calling thread: a round trip to a worker
    #: costs about three messages' opening (one result: 0.4 ms here, 1.5 ms there and
    #: back), and a hub at rest (heartbeats, statuses) starts no worker at all.
    INLINE_BELOW = 4

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._context: _SpawnContext | None = None

    @property
    def parallel(self) -> bool:
        return self.processes > 0

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._context = _SpawnContext()
            self._pool = ProcessPoolExecutor(self.processes, mp_context=self._context,
                                             initializer=_exit_with, initargs=(os.getpid(),))
        return self._pool

    def submit(self, bodies: Sequence[str], keys: KeyTable) -> PendingBatch:
        if not self.parallel or len(bodies) < self.INLINE_BELOW:
            return PendingBatch(self, bodies, keys, None)
        size = max(self.CHUNK, -(-len(bodies) // self.processes))
        try:
            pool = self._executor()
            futures = [pool.submit(open_batch, list(bodies[i:i + size]), dict(keys))
                       for i in range(0, len(bodies), size)]
        except BrokenProcessPool:
            self.restart()
            return PendingBatch(self, bodies, keys, None)
        return PendingBatch(self, bodies, keys, futures)

    def pids(self) -> list[int]:
        """The current pool's worker processes still running (none before the first
        batch)."""
        context = self._context
        return sorted(p.pid for p in context.started
                      if p.pid is not None and p.is_alive()) if context is not None else []

    def restart(self) -> None:
        """Drop a broken pool; the next batch starts a new one."""
        pool, self._pool, self._context = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool, self._context = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
