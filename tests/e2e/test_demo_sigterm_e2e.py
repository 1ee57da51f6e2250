"""``tributary demo`` stopped by SIGTERM (a service manager, ``kill``, a closing terminal's
cousin SIGHUP) stops what it started, as Ctrl-C does: the hub, the spokes and the demo's
broker leave no orphan. Before that, it printed how to sign in as each person it made and
where its publisher key is (docs/algorithm-sdk.md, publishing into the demo)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from child_processes import alive

from tributary.testbed.federation import free_port

pytestmark = pytest.mark.e2e


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found



def test_sigterm_stops_the_whole_demo(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.log"
    port = free_port()
    with open(log, "w") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "tributary.cli", "demo", "--cases", "1", "--hub-port",
             str(port), "--workdir", str(workdir)], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    try:
        deadline = time.monotonic() + 240
        while "keeps running" not in log.read_text():
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        text = log.read_text()
        for username in ("admin", "reviewer-a", "reviewer-b"):
            assert re.search(rf"^\s+{username}\s+password \S{{12,}}", text, re.MULTILINE), text
        assert f"Publisher key: {workdir / 'publisher.key'}" in text
        children = descendants(demo.pid)
        [pid_file] = list(workdir.glob("broker/**/broker.pid"))
        broker = int(pid_file.read_text())
        assert len(children) >= 2 and alive(broker)  # hub, spoke (and their own children)

        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=90)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in (*children, broker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        survivors = {p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ")[:200]
                     for p in (*children, broker) if alive(p)}
        assert survivors == {}, log.read_text()[-3000:]
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
