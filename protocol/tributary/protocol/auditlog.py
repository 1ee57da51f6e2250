"""Forensic audit logs: append-only JSON lines in which every entry hashes the one before.

A database table can be edited in place without trace; a hash chain in a plain file makes
an edited, deleted, reordered or inserted entry detectable by anyone holding a copy, with
no key and no service (:func:`verify_log`, ``tributary audit verify``). Each line is the
canonical JSON (sorted keys, no spaces, ASCII) of::

    {"seq": n, "at": ISO-8601 UTC, "actor", "action", "target", "detail": {...},
     "prev": sha256 of the previous line (64 zeros for the first),
     "hash": sha256 of this entry without "hash"}

What a chain alone cannot show is the loss of its newest entries (a cut at a line
boundary), or a log deleted and started again at seq 1: that takes a head (:class:`AuditHead`)
kept somewhere else, passed back as ``expect_head``. Heads are anchored automatically: each
spoke's travels in its heartbeats and the hub keeps the highest; the hub's own is stored
with every audit row in its database and written into every study bundle
(:class:`AuditAnchors`, ``tributary audit verify LOG --anchors``).

Appends take an exclusive ``flock`` and are fsynced, so threads and processes may share one
log, and an acknowledged entry survives a crash.
Detail keys that name secrets (passwords, tokens, private keys...) are redacted.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretBytes, SecretStr

from tributary.protocol.canonical import canonical_json, sha256_hex

GENESIS = "0" * 64
REDACTED = "[redacted]"
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "seq": int, "at": str, "actor": str, "action": str, "target": str, "detail": dict,
    "prev": str, "hash": str,
}
_SECRET_WORDS = frozenset({
    "password", "passwd", "passphrase", "pwd", "secret", "secrets", "token", "credential",
    "credentials", "authorization", "cookie", "apikey", "privkey", "privatekey",
})
_TAIL_CHUNK = 64 * 1024

# Reasons a verification or an append can give for a broken entry.
NOT_JSON = "not JSON"
NOT_AN_ENTRY = "not an audit entry"
EDITED = "hash mismatch (edited)"
CHAIN_BREAK = "chain break (deleted or reordered)"
SEQUENCE_GAP = "sequence gap"
TRUNCATED = "incomplete last line (truncated)"
MISSING_HEAD = "expected head missing (truncated)"
HEAD_MISMATCH = "expected head differs (rewritten)"


class AuditHead(BaseModel):
    """A log's newest entry, kept outside the log: its ``seq`` and its ``hash`` field."""

    # Validators built when first used: a process that only appends (a de-identifying
    # command) never uses them.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    seq: int = Field(ge=0, le=2**31 - 1)  # a database integer everywhere
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class AuditAnchors(BaseModel):
    """The heads a hub holds: its own log's and each spoke's (from its heartbeats). Served
    by ``GET /api/audit/anchors`` and written as ``audit-anchors.json`` into every bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    hub: AuditHead | None = None
    spokes: dict[str, AuditHead] = Field(default_factory=dict)
    at: datetime | None = None

    def head(self, source: str) -> AuditHead | None:
        """The head of ``source``: ``hub`` or a spoke id."""
        return self.hub if source == "hub" else self.spokes.get(source)


class AuditLogError(RuntimeError):
    """The log cannot be appended to, because its last entry is broken or unreadable."""


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value that hashes are taken over (ASCII-only, so a line
    never changes under a text tool's encoding)."""
    return canonical_json(obj, ascii_only=True)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The ``hash`` field: sha256 of the canonical entry without its ``hash`` field."""
    return sha256_hex(canonical({k: v for k, v in entry.items() if k != "hash"}))


@functools.lru_cache(maxsize=4096)  # detail keys are few; this runs for each of them
def is_secret_name(name: str) -> bool:
    """Whether a detail key names secret or key material: ``password``, ``api_token``,
    ``signingKey``, ``private_key_pem``, ``key`` (but not ``key_id``, ``keyid``)."""
    words = [w for w in re.split(r"[^a-z0-9]+",
                                 re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()) if w]
    if not words:
        return False
    return (words[-1] == "key" or not _SECRET_WORDS.isdisjoint(words)
            or any("password" in w for w in words)
            or ("key" in words and not {"private", "material", "pem", "bytes"}.isdisjoint(words)))


def redact(value: Any) -> Any:
    """A JSON-safe copy of ``value`` with secret-named keys and secret values replaced."""
    if isinstance(value, Mapping):
        return {str(k): REDACTED if is_secret_name(str(k)) else redact(v)
                for k, v in value.items()}
    if isinstance(value, SecretStr | SecretBytes):
        return REDACTED
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str):
        return str(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return redact(value.model_dump(mode="json"))
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(v) for v in value]
    if isinstance(value, bytes | bytearray):
        # Raw bytes could be anything; the log keeps what identifies them, not them.
        return {"bytes": len(value), "sha256": sha256_hex(bytes(value))}
    return str(value)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Broken(Exception):
    def __init__(self, reason: str, seq: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seq = seq


def _check_line(raw: bytes) -> dict[str, Any]:
    """Parse one line (without its newline) and check it is a well-formed, unedited entry."""
    try:
        entry = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _Broken(NOT_JSON) from None
    if not isinstance(entry, dict):
        raise _Broken(NOT_JSON)
    seq = entry.get("seq") if type(entry.get("seq")) is int else None
    for name, kind in _FIELDS.items():
        if not isinstance(entry.get(name), kind) or isinstance(entry.get(name), bool):
            raise _Broken(f"{NOT_AN_ENTRY} (field {name!r})", seq)
    if set(entry) != set(_FIELDS):
        raise _Broken(f"{NOT_AN_ENTRY} (fields {sorted(set(entry) - set(_FIELDS))})", seq)
    # A re-serialised line that differs from the bytes on disk was edited, even if only in
    # layout: the next entry's ``prev`` is taken over these exact bytes.
    try:
        same = canonical(entry) == raw
    except ValueError:
        same = False
    if entry_hash(entry) != entry["hash"] or not same:
        raise _Broken(EDITED, seq)
    return entry


def _last_line(fd: int, size: int) -> bytes:
    """The last line of the file, with its newline if it has one."""
    pos, buf = size, b""
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1:]
    return buf


class AuditLog:
    """One append-only, hash-chained log file, safe to share between threads and processes.

    Opening checks the last entry and resumes its chain; a log whose tail is broken is
    refused (:class:`AuditLogError`) rather than extended, so a tampered or torn log is
    never silently legitimised by new entries chained onto it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        # (inode, size, seq, line digest) after this object's last append: lets the next
        # append skip re-reading the tail when no other process wrote in between.
        self._cache: tuple[int, int, int, str] | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with self._locked() as fd:
            self._head(fd)
        if created:
            _fsync_dir(self.path.parent)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        with self._lock:
            # Opened per append, never kept: a descriptor inherited across fork() would share
            # its flock with the child and defeat the lock between the two processes.
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd
            finally:
                os.close(fd)  # releases the flock

    def _head(self, fd: int) -> tuple[int, str]:
        """(seq, digest) of the last line, which the next entry continues from."""
        info = os.fstat(fd)
        if self._cache is not None and self._cache[:2] == (info.st_ino, info.st_size):
            return self._cache[2], self._cache[3]
        if info.st_size == 0:
            return 0, GENESIS
        line = _last_line(fd, info.st_size)
        try:
            if not line.endswith(b"\n"):
                raise _Broken(TRUNCATED)
            entry = _check_line(line[:-1])
        except _Broken as exc:
            raise AuditLogError(
                f"refusing to append to {self.path}: its last entry is broken ({exc.reason}); "
                f"run `tributary audit verify {self.path}`, keep the file as evidence and "
                "start a new log") from None
        return entry["seq"], sha256_hex(line[:-1])

    def head(self) -> AuditHead:
        """The newest entry's seq and hash (seq 0 for an empty log): what to anchor."""
        with self._locked() as fd:
            size = os.fstat(fd).st_size
            if size == 0:
                return AuditHead(seq=0, hash=GENESIS)
            line = _last_line(fd, size)
            try:
                if not line.endswith(b"\n"):
                    raise _Broken(TRUNCATED)
                entry = _check_line(line[:-1])
            except _Broken as exc:
                raise AuditLogError(f"{self.path}: its last entry is broken ({exc.reason})"
                                    ) from None
        return AuditHead(seq=entry["seq"], hash=entry["hash"])

    def append(self, actor: str, action: str, target: str = "",
               detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write one entry durably (fsynced before returning) and return it."""
        return self.append_many([(actor, action, target, detail)])[0]

    def append_many(self, events: Sequence[tuple[str, str, str, Mapping[str, Any] | None]]
                    ) -> list[dict[str, Any]]:
        """Write entries (actor, action, target, detail), in order, with one write and one
        fsync: what a hub ingesting a batch of messages in one transaction appends. Either
        every entry is written or none is."""
        bodies = [{"actor": str(actor), "action": str(action), "target": str(target),
                   "detail": redact(dict(detail or {}))}
                  for actor, action, target, detail in events]
        if not bodies:
            return []
        with self._locked() as fd:
            seq, prev = self._head(fd)
            entries, lines = [], []
            # Every line is serialised before the first byte is written: an event that
            # cannot be serialised stops the whole write, never half-way through it.
            for body in bodies:
                seq += 1
                entry = {"seq": seq, "at": _now(), **body, "prev": prev}
                entry["hash"] = entry_hash(entry)
                line = canonical(entry)
                prev = sha256_hex(line)
                entries.append(entry)
                lines.append(line)
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, b"\n".join(lines) + b"\n")
                os.fsync(fd)
            except BaseException:
                # A torn line would make every later append refuse; take it back.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
            info = os.fstat(fd)
            self._cache = (info.st_ino, info.st_size, seq, prev)
        return entries


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify_log`; ``line`` and ``seq`` name the first broken entry."""

    path: Path
    ok: bool
    #: Entries that verified (all of them when ``ok``; those before the break otherwise).
    entries: int
    line: int | None = None
    #: The broken entry's own ``seq`` when it could be read, else None.
    seq: int | None = None
    reason: str | None = None
    #: ``seq`` and ``hash`` of the last intact entry: keep them to detect a later truncation.
    head_seq: int = 0
    head_hash: str = GENESIS

    #: The head checked against (``expect_head``), if any.
    anchor: tuple[int, str] | None = None

    def summary(self) -> str:
        anchored = (f"; anchored head seq {self.anchor[0]} present"
                    if self.anchor is not None else "")
        if self.ok:
            return (f"{self.path}: intact, {self.entries} entries; head seq {self.head_seq} "
                    f"hash {self.head_hash}{anchored}")
        seq = (f"seq {self.seq}" if self.seq is not None
               else f"seq unknown, expected {self.head_seq + 1}")
        if self.reason in (MISSING_HEAD, HEAD_MISMATCH) and self.anchor is not None:
            seq += f", anchored head seq {self.anchor[0]} hash {self.anchor[1]}"
        return (f"{self.path}: BROKEN at line {self.line} ({seq}): {self.reason}; "
                f"{self.entries} entries before it verified")


def verify_log(path: str | os.PathLike[str],
               expect_head: tuple[int, str] | None = None) -> VerifyReport:
    """Check every entry's hash, its link to the previous line and its sequence number,
    stopping at the first broken entry. ``expect_head`` (seq, hash), recorded from an
    earlier verification, additionally catches entries cut off the end."""
    path = Path(path)
    count, prev, head_seq, head_hash = 0, GENESIS, 0, GENESIS
    anchor_line: int | None = None

    def broken(line: int, reason: str, seq: int | None) -> VerifyReport:
        return VerifyReport(path, False, count, line, seq, reason, head_seq, head_hash,
                            expect_head)

    with open(path, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)  # no half-written line from a writer
        for number, raw in enumerate(handle, 1):
            try:
                if not raw.endswith(b"\n"):
                    raise _Broken(TRUNCATED)
                entry = _check_line(raw[:-1])
                if entry["prev"] != prev:
                    raise _Broken(CHAIN_BREAK, entry["seq"])
                if entry["seq"] != head_seq + 1:
                    raise _Broken(SEQUENCE_GAP, entry["seq"])
            except _Broken as exc:
                return broken(number, exc.reason, exc.seq)
            if expect_head is not None and entry["seq"] == expect_head[0]:
                if entry["hash"] != expect_head[1]:
                    return broken(number, HEAD_MISMATCH, entry["seq"])
                anchor_line = number
            count, prev = count + 1, sha256_hex(raw[:-1])
            head_seq, head_hash = entry["seq"], entry["hash"]
    if expect_head is not None and anchor_line is None and expect_head[0] > 0:
        return broken(count + 1, MISSING_HEAD, None)
    return VerifyReport(path, True, count, head_seq=head_seq, head_hash=head_hash,
                        anchor=expect_head)


def read_entries(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number, entry) for each line, None for lines that are not JSON objects; for
    display only: it does not verify anything."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                entry = json.loads(raw)
            except (UnicodeDecodeError, ValueError):
                entry = None
            yield number, entry if isinstance(entry, dict) else None
