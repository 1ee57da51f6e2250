"""The lease's behaviour between two real processes, for each database the hub runs on
(SQLite in tests/unit/test_lease.py, PostgreSQL in tests/e2e/test_hub_postgres_e2e.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from tributary.hub.db import make_engine
from tributary.hub.lease import Lease

HOLDER = Path(__file__).with_name("lease_holder.py")


def start_holder(url: str, name: str) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, str(HOLDER), url, name],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    return holder


def one_holder_and_failover_after_kill_9(url: str) -> None:
    """While another process holds the lease nobody else gets it (another duty's lease is
    independent); killed with -9, its lease passes at the next try; released, it is free."""
    engine = make_engine(url, migrate=False)
    holder = start_holder(url, "training")
    try:
        mine, other = Lease(engine, "training"), Lease(engine, "another-duty")
        assert not mine.try_acquire() and not mine.held()
        assert not mine.try_acquire()  # asking again changes nothing
        assert other.try_acquire() and other.held()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert mine.try_acquire() and mine.held()
        second = Lease(engine, "training")
        assert not second.try_acquire()  # held by this process's first lease now
        mine.release()
        assert not mine.held() and second.try_acquire()
        second.release()
        other.release()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        engine.dispose()
