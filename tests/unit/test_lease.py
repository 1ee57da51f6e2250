"""The hub's lease on SQLite: a lock file beside the database, between real processes."""

from __future__ import annotations

from pathlib import Path

from lease_checks import one_holder_and_failover_after_kill_9
from sqlalchemy import create_engine

from tributary.hub.db import make_engine
from tributary.hub.lease import Lease, lock_key


def test_one_holder_and_failover_after_kill_9(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    make_engine(url).dispose()
    one_holder_and_failover_after_kill_9(url)
    assert (tmp_path / "hub.db.training.lease").exists()


def test_an_in_memory_database_has_one_process_whose_lease_it_is() -> None:
    lease = Lease(create_engine("sqlite://"), "training")
    assert lease.path() is None and lease.try_acquire() and lease.held()
    lease.release()
    assert not lease.held()


def test_keys_are_stable_and_distinct_per_duty() -> None:
    assert lock_key("training") == lock_key("training") != lock_key("results")
    assert -2**63 <= lock_key("training") < 2**63
