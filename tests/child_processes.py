"""Child processes a test started, read from /proc.

A test's process is not only the test's: under pytest-xdist the same worker process is
the parent of the session's federation (its hub and spokes), so "every child of this
process" would count them, and killing "a worker" could kill the session's hub. Take a
snapshot before the run and look only at children born after it."""

from __future__ import annotations

import os
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
