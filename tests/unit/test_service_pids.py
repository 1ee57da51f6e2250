"""A service's pid file names a live process only while that process runs: a process that
died but was never reaped by its parent (a zombie: the test process that started the
service lazily, for instance) is not running, so the service is started again rather
than taken for up and never answering."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tributary.services.system import read_pid


def test_a_live_process_is_read_and_a_dead_unreaped_one_is_not(tmp_path: Path) -> None:
    pidfile = tmp_path / "service.pid"
    child = subprocess.Popen(["sleep", "30"])
    try:
        pidfile.write_text(str(child.pid))
        assert read_pid(pidfile) == child.pid
        os.kill(child.pid, 9)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not die"
            time.sleep(0.05)
        assert read_pid(pidfile) is None  # dead, though its pid is still taken
    finally:
        child.kill()
        child.wait()
    assert read_pid(pidfile) is None
    pidfile.write_text("not a pid")
    assert read_pid(pidfile) is None
