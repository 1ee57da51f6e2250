"""Child processes a test started, read from /proc.

A test's process is not only the test's: under pytest-xdist the same worker process is
the parent of the session's federation (its hub and spokes), so "every child of this
process" would count them, and killing "a worker" could kill the session's hub. Take a
snapshot before the run and look only at children born after it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: its parent has not reaped it yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def live_children() -> set[int]:
    """This process's live children (zombies left out)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(entry.name))
    return found


class NewChildren:
    """Called, the live children started since it was made, oldest pid first."""

    def __init__(self) -> None:
        self.before = live_children()

    def __call__(self) -> list[int]:
        return sorted(live_children() - self.before)


class WorkerKiller:
    """A progress callback (files done) that kills one worker process of the run with
    SIGKILL once it has been sent files: after the 10th file it gives the workers time to
    start (the run's own process prepares files too), then kills the oldest child born
    since it was made."""

    def __init__(self) -> None:
        self.workers = NewChildren()  # not the session's hub and spokes
        self.killed: list[int] = []

    def __call__(self, done: int) -> None:
        if done == 10:
            time.sleep(3)
        elif done > 10 and not self.killed:
            victims = self.workers()
            assert victims, "the run uses worker processes"
            os.kill(victims[0], signal.SIGKILL)
            self.killed.append(victims[0])
