"""The publisher keys a spoke trusts: those its TOML names (``[trust] publisher_keys``) and
those its data steward added from the command line (``tributary spoke trust add``), kept
in a trust store file in the work folder. The running agent re-reads the store whenever
the file changes, so a steward's decision takes effect without editing TOML or restarting,
and the next heartbeat tells the hub."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tributary.protocol.messages import MAX_REPORTED_PUBLISHERS, PublisherTrust
from tributary.protocol.signing import PublicKey

log = logging.getLogger(__name__)

#: The trust store, in the spoke's work folder; written only by ``tributary spoke trust``.
STORE_NAME = "trusted-publishers.json"
#: A bound on what a store may hold, so a damaged or hostile file cannot exhaust memory.
MAX_STORE_BYTES = 1024 * 1024


class TrustError(ValueError):
    """A trust decision that cannot be taken (unreadable key, unknown key id, ...)."""


class TrustedPublisher(BaseModel):
    """A publisher key a steward decided to trust, with who decided and why."""

    model_config = ConfigDict(extra="forbid")

    keyid: str
    name: str = Field(max_length=200)
    public_key_pem: str = Field(max_length=4096)
    steward: str = Field(max_length=200)
    reason: str = Field(max_length=2000)
    added_at: datetime


class TrustStoreFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    publishers: list[TrustedPublisher] = Field(default_factory=list)


def store_path(work_dir: Path) -> Path:
    return work_dir / STORE_NAME


def read_store(work_dir: Path) -> TrustStoreFile:
    """The store's content; an absent store is empty, a damaged one an error."""
    path = store_path(work_dir)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_STORE_BYTES + 1)
    except FileNotFoundError:
        return TrustStoreFile()
    if len(raw) > MAX_STORE_BYTES:
        raise TrustError(f"{path} is larger than {MAX_STORE_BYTES} bytes")
    try:
        return TrustStoreFile.model_validate_json(raw)
    except ValidationError as exc:
        raise TrustError(f"{path} is not a trust store: {exc.errors()[0]['msg']}") from None


@contextmanager
def _locked(work_dir: Path) -> Iterator[None]:
    """One writer at a time (two stewards at two terminals)."""
    with open(work_dir / f"{STORE_NAME}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield


def _write(work_dir: Path, store: TrustStoreFile) -> None:
    """Atomically: the agent reads either the old store or the new one, never half."""
    path = store_path(work_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(store.model_dump_json(indent=2))
    tmp.chmod(0o644)
    os.replace(tmp, path)


def add(work_dir: Path, pem: bytes, name: str, steward: str, reason: str) -> TrustedPublisher:
    """Trust the publisher key ``pem``; returns the entry (an error if already trusted)."""
    try:
        key = PublicKey.from_pem(pem)
    except Exception as exc:  # any unreadable key gets one clear message
        raise TrustError(f"not an Ed25519 public key (PEM): {type(exc).__name__}") from None
    if not reason.strip():
        raise TrustError("give the reason for the decision (--reason)")
    entry = TrustedPublisher(keyid=key.keyid, name=name or key.keyid[:16],
                             public_key_pem=key.pem, steward=steward, reason=reason,
                             added_at=datetime.now(UTC))
    with _locked(work_dir):
        store = read_store(work_dir)
        if any(p.keyid == key.keyid for p in store.publishers):
            raise TrustError(f"publisher key {key.keyid} is already trusted")
        store.publishers.append(entry)
        _write(work_dir, store)
    return entry


def remove(work_dir: Path, keyid: str) -> TrustedPublisher:
    """Stop trusting a key the store holds (a key id or an unambiguous prefix of one)."""
    with _locked(work_dir):
        store = read_store(work_dir)
        matches = [p for p in store.publishers if p.keyid.startswith(keyid)] if keyid else []
        if len(matches) != 1:
            raise TrustError(f"{'no' if not matches else 'more than one'} publisher key in "
                             f"the trust store matches {keyid!r}")
        store.publishers.remove(matches[0])
        _write(work_dir, store)
    return matches[0]


class TrustedKeys:
    """The keys the running spoke trusts now: the configured ones and the store's, re-read
    when the store file changes (checked on every use: one ``stat``)."""

    def __init__(self, work_dir: Path, configured: list[PublicKey],
                 sandbox: bool = False) -> None:
        self.work_dir = work_dir
        self.configured = configured
        self.sandbox = sandbox
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._stored: list[PublicKey] = []

    def _refresh(self) -> None:
        stamp = self.stamp()
        if stamp == self._stamp:
            return
        try:
            store = read_store(self.work_dir)
            keys = [PublicKey.from_pem(p.public_key_pem) for p in store.publishers]
        except Exception as exc:  # keep the last good store, say why
            log.error("trust store not re-read, keeping the previous one: %s", exc)
            self._stamp = stamp
            return
        self._stamp = stamp
        self._stored = keys
        log.info("trusted publisher keys: %d configured, %d from the trust store",
                 len(self.configured), len(keys))

    def stamp(self) -> tuple[int, int] | None:
        """The store file's (mtime, size) now: changes when a steward decides."""
        try:
            stat = store_path(self.work_dir).stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def current(self) -> list[PublicKey]:
        with self._lock:
            self._refresh()
            seen: dict[str, PublicKey] = {}
            for key in [*self.configured, *self._stored]:
                seen.setdefault(key.keyid, key)
            return list(seen.values())

    def report(self) -> PublisherTrust:
        """What the heartbeat says: whether a publisher is required and which keys."""
        keyids = [k.keyid for k in self.current()]
        return PublisherTrust(required=bool(keyids), keyids=keyids[:MAX_REPORTED_PUBLISHERS],
                              truncated=len(keyids) > MAX_REPORTED_PUBLISHERS,
                              sandbox=self.sandbox)
