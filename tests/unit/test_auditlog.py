"""Forensic audit logs: the hash chain, tamper detection naming the broken entry, concurrent
appends from threads and processes, the ``tributary audit`` command and the hub's log."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.hub.db import make_engine
from tributary.hub.models import AuditEvent
from tributary.hub.services import audit
from tributary.protocol.auditlog import (
    CHAIN_BREAK,
    EDITED,
    GENESIS,
    MISSING_HEAD,
    NOT_JSON,
    REDACTED,
    SEQUENCE_GAP,
    TRUNCATED,
    AuditLog,
    AuditLogError,
    canonical,
    entry_hash,
    is_secret_name,
    sha256_hex,
    verify_log,
)


def make_log(path: Path, entries: int = 5) -> list[bytes]:
    log = AuditLog(path)
    for n in range(entries):
        log.append("tester", "thing.done", f"t{n}", {"n": n})
    return path.read_bytes().splitlines(keepends=True)


def test_chain_appends_and_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = make_log(path, 3)
    entries = [json.loads(line) for line in lines]
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    for before, line, entry in zip(lines, lines[1:], entries[1:], strict=False):
        assert entry["prev"] == sha256_hex(before.rstrip(b"\n"))
        assert canonical(entry) + b"\n" == line
    assert all(e["hash"] == entry_hash(e) and e["at"].endswith("Z") for e in entries)
    report = verify_log(path)
    assert report.ok and report.entries == 3 and report.head_seq == 3
    assert report.head_hash == entries[-1]["hash"]
    assert "intact, 3 entries" in report.summary()


def test_reopening_resumes_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    make_log(path, 2)
    AuditLog(path).append("again", "thing.done")
    assert verify_log(path).ok and verify_log(path).entries == 3


def test_secrets_are_redacted(tmp_path: Path) -> None:
    from pydantic import SecretStr

    log = AuditLog(tmp_path / "audit.jsonl")
    entry = log.append("a", "key.enrolled", "s", {
        "password": "p", "broker": {"api_token": "t", "host": "h"}, "signingKey": "k",
        "private_key_pem": "x", "key": "k", "keyid": "abc", "key_id": "abc",
        "login": SecretStr("s"), "raw": b"\x00secret"})
    detail = entry["detail"]
    for name in ("password", "signingKey", "private_key_pem", "key", "login"):
        assert detail[name] == REDACTED, name
    assert detail["broker"] == {"api_token": REDACTED, "host": "h"}
    assert detail["keyid"] == detail["key_id"] == "abc"
    assert detail["raw"]["bytes"] == 7 and "secret" not in json.dumps(detail)
    assert b"\"p\"" not in (tmp_path / "audit.jsonl").read_bytes()
    assert not is_secret_name("monkey") and not is_secret_name("keys_checked")


def _edit(lines: list[bytes]) -> list[bytes]:
    entry = json.loads(lines[2])
    entry["detail"]["n"] = 99
    return [*lines[:2], canonical(entry) + b"\n", *lines[3:]]


def _edit_and_rehash(lines: list[bytes]) -> list[bytes]:
    entry = json.loads(lines[2])
    entry["target"] = "forged"
    entry["hash"] = entry_hash(entry)
    return [*lines[:2], canonical(entry) + b"\n", *lines[3:]]


def _forge_after(lines: list[bytes], index: int, seq: int) -> bytes:
    entry = {"seq": seq, "at": "2020-01-01T00:00:00.000000Z", "actor": "mallory",
             "action": "thing.done", "target": "x", "detail": {},
             "prev": sha256_hex(lines[index].rstrip(b"\n"))}
    entry["hash"] = entry_hash(entry)
    return canonical(entry) + b"\n"


TAMPERINGS: dict[str, tuple[Callable[[list[bytes]], list[bytes]], int, int | None, str]] = {
    # name: (tampering, broken line, its seq, reason)
    "edit a field": (_edit, 3, 3, EDITED),
    "edit a field and recompute its hash": (_edit_and_rehash, 4, 4, CHAIN_BREAK),
    "reformat a line": (lambda ls: [*ls[:2], json.dumps(json.loads(ls[2])).encode() + b"\n",
                                    *ls[3:]], 3, 3, EDITED),
    "delete a line": (lambda ls: ls[:2] + ls[3:], 3, 4, CHAIN_BREAK),
    "delete the first line": (lambda ls: ls[1:], 1, 2, CHAIN_BREAK),
    "swap two lines": (lambda ls: [ls[0], ls[2], ls[1], *ls[3:]], 2, 3, CHAIN_BREAK),
    "truncate mid-line": (lambda ls: [*ls[:4], ls[4][:40]], 5, None, TRUNCATED),
    "insert a naive forged line": (
        lambda ls: [*ls[:2], ls[1].replace(b"tester", b"mallor"), *ls[2:]], 3, 2, EDITED),
    "insert a forged line with a valid hash": (
        lambda ls: [*ls[:2], _forge_after(ls, 1, 3), *ls[2:]], 4, 3, CHAIN_BREAK),
    "renumber a forged entry": (
        lambda ls: [*ls[:2], _forge_after(ls, 1, 7)], 3, 7, SEQUENCE_GAP),
    "insert a line that is not JSON": (lambda ls: [*ls[:3], b"{oops\n", *ls[3:]], 4, None,
                                       NOT_JSON),
    "insert a blank line": (lambda ls: [*ls[:1], b"\n", *ls[1:]], 2, None, NOT_JSON),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampering_is_detected_and_the_entry_named(tmp_path: Path, name: str) -> None:
    tamper, line, seq, reason = TAMPERINGS[name]
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(tamper(make_log(path))))
    report = verify_log(path)
    assert not report.ok
    assert (report.line, report.seq, report.reason) == (line, seq, reason)
    assert report.entries == line - 1
    assert f"BROKEN at line {line}" in report.summary() and reason in report.summary()

    result = CliRunner().invoke(app, ["audit", "verify", str(path)])
    assert result.exit_code == 1
    assert f"line {line}" in result.output and reason in result.output
    if seq is not None:
        assert f"seq {seq}" in result.output


def test_cutting_whole_entries_off_the_end_needs_the_recorded_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = make_log(path)
    head = verify_log(path)
    path.write_bytes(b"".join(lines[:3]))
    assert verify_log(path).ok  # the chain alone cannot tell
    report = verify_log(path, (head.head_seq, head.head_hash))
    assert not report.ok and report.reason == MISSING_HEAD and report.line == 4

    runner = CliRunner()
    anchor = f"{head.head_seq}:{head.head_hash}"
    result = runner.invoke(app, ["audit", "verify", str(path), "--expect-head", anchor])
    assert result.exit_code == 1 and MISSING_HEAD in result.output
    path.write_bytes(b"".join(lines))
    result = runner.invoke(app, ["audit", "verify", str(path), "--expect-head", anchor])
    assert result.exit_code == 0, result.output


def test_refuses_to_extend_a_broken_log(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = make_log(path, 3)
    log = AuditLog(path)
    path.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"t2", b"t9")[:-1])
    with pytest.raises(AuditLogError, match="truncated"):
        AuditLog(path)
    with pytest.raises(AuditLogError, match="refusing to append"):
        log.append("tester", "thing.done")
    path.write_bytes(b"".join(lines[:2]) + lines[2].replace(b"t2", b"t9"))
    with pytest.raises(AuditLogError, match="edited"):
        AuditLog(path)


def test_concurrent_appends_from_threads_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    shared = AuditLog(path)

    def work(n: int) -> None:
        own = AuditLog(path)  # separate instances contend through the file lock
        for i in range(40):
            (shared if i % 2 else own).append(f"thread-{n}", "thing.done", str(i))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = verify_log(path)
    assert report.ok, report.summary()
    assert report.entries == 8 * 40


APPENDER = """
import sys
from tributary.protocol.auditlog import AuditLog
log = AuditLog(sys.argv[1])
for i in range(int(sys.argv[3])):
    log.append(sys.argv[2], "thing.done", str(i))
"""


def test_concurrent_appends_from_processes_keep_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).append("parent", "log.created")
    workers = [subprocess.Popen([sys.executable, "-c", APPENDER, str(path), f"proc-{n}", "150"])
               for n in range(2)]
    local = AuditLog(path)
    for i in range(50):
        local.append("parent", "thing.done", str(i))
    assert [w.wait(120) for w in workers] == [0, 0]
    report = verify_log(path)
    assert report.ok, report.summary()
    assert report.entries == 1 + 2 * 150 + 50
    actors = [json.loads(line)["actor"] for line in path.read_bytes().splitlines()]
    assert actors.count("proc-0") == actors.count("proc-1") == 150


def test_cli_verify_and_show(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append("spoke-a", "container.started", "c1", {"limits": {"memory_mb": 512}})
    log.append("spoke-a", "container.finished", "c1", {"exit_code": 0})
    log.append("spoke-a", "result.published", "e1", {"case": "c-1"})
    runner = CliRunner()

    result = runner.invoke(app, ["audit", "verify", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") == 1 and "intact, 3 entries" in result.output

    result = runner.invoke(app, ["audit", "show", str(path), "--action", "container.*"])
    assert result.exit_code == 0
    assert ["container.started" in result.output, "result.published" in result.output] == [
        True, False]
    result = runner.invoke(app, ["audit", "show", str(path), "--tail", "1", "--json"])
    assert json.loads(result.output)["action"] == "result.published"

    assert runner.invoke(app, ["audit", "verify", str(tmp_path / "missing")]).exit_code == 2
    bad_head = runner.invoke(app, ["audit", "verify", str(path), "--expect-head", "x"])
    assert bad_head.exit_code == 2


def test_hub_records_every_event_in_its_forensic_log(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with Session(engine) as session:
        audit.record(session, "admin", "spoke.registered", "north", name="North",
                     password="hunter2")
        session.commit()
    with Session(engine) as session:
        audit.record(session, "admin", "spoke.registered", "south")
        session.rollback()  # the line stays: the log records what was attempted
        rows = session.exec(select(AuditEvent)).all()
    # Opening the new database created its schema: that is the first event.
    assert [r.target for r in rows] == ["database", "north"]
    assert rows[1].detail["password"] == REDACTED
    default = tmp_path / "hub-audit.jsonl"  # beside the database when not configured
    entries = [json.loads(line) for line in default.read_text().splitlines()]
    assert [(e["action"], e["target"]) for e in entries] == [
        ("hub.schema_created", "database"), ("spoke.registered", "north"),
        ("spoke.registered", "south")]
    assert entries[1]["detail"] == {"name": "North", "password": REDACTED}
    assert verify_log(default).ok

    configured = tmp_path / "elsewhere" / "audit.jsonl"
    audit.attach_forensic_log(engine, configured)
    with Session(engine) as session:
        audit.record(session, "admin", "key.revoked", "north", keyid="abc")
        session.commit()
    assert verify_log(configured).entries == 1
    engine.dispose()
