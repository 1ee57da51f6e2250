"""The hub on a real PostgreSQL server (Debian's package, started by the project's own
code): migrations build the models' schema there too, several processes opening a new
database migrate it once (the advisory lock), and a study runs end to end with every
result stored in PostgreSQL and kept across a hub restart."""

from __future__ import annotations

import multiprocessing
import uuid
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from lease_checks import one_holder_and_failover_after_kill_9, start_holder
from sqlalchemy import create_engine, text
from sqlmodel import SQLModel

from tributary.hub import migrations
from tributary.hub.db import open_database
from tributary.hub.lease import Lease, lock_key
from tributary.hub.services.throttle import SignInThrottle
from tributary.hub.settings import HubSettings
from tributary.protocol.auditlog import read_entries
from tributary.services import postgres
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(service_settings: ServiceSettings) -> str:
    return postgres.ensure_running(service_settings)


def new_database(server: str) -> str:
    return postgres.create_database(server, f"hub_{uuid.uuid4().hex[:10]}")


def _open(url: str, audit_log: Path) -> str | None:
    return migrations.current(open_database(HubSettings(database_url=url,
                                                        audit_log=audit_log)))


def test_processes_opening_a_new_postgres_database_migrate_it_once(server: str,
                                                                  tmp_path: Path) -> None:
    url = new_database(server)
    log = tmp_path / "audit.jsonl"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        assert pool.starmap(_open, [(url, log)] * 4) == [migrations.head()] * 4
    assert [e["action"] for _, e in read_entries(log)] == ["hub.schema_created"]
    engine = create_engine(url)
    with engine.connect() as connection:
        created = connection.execute(text(
            "SELECT count(*) FROM auditevent WHERE action = 'hub.schema_created'")).scalar()
        differences = compare_metadata(
            MigrationContext.configure(connection, opts={"compare_type": True}),
            SQLModel.metadata)
    engine.dispose()
    assert created == 1
    assert differences == []


def test_a_study_on_a_postgres_hub(server: str, service_settings: ServiceSettings,
                                   detector_image: tuple[str, str], tmp_path: Path) -> None:
    url = new_database(server)
    federation = LocalFederation(tmp_path / "federation", service_settings,
                                 hub_env={"TRIBUTARY_HUB_DATABASE_URL": url})
    sizes = {"pg-north": 4, "pg-south": 3}
    try:
        federation.start_hub()
        for index, (spoke_id, count) in enumerate(sizes.items()):
            data = federation.root / "data" / spoke_id
            generate_cohort(data, count, seed=300 + index, site=spoke_id)
            federation.start_spoke(spoke_id, federation.add_spoke(spoke_id, data))
        algorithm = federation.register_algorithm(
            name="lung-nodule-pg", version="1", repository=detector_image[0],
            digest=detector_image[1], aggregator="nodule-detection")
        with federation.api() as api:
            created = api.post("/api/experiments", json={
                "name": "postgres study", "algorithm_id": algorithm["id"],
                "arguments": {"min_diameter_mm": 4.0}, "spoke_ids": list(sizes),
                "release": ["nodules"], "limits": {"timeout_seconds": 300}})
            assert created.status_code == 201, created.text
            experiment_id = created.json()["id"]
            assert api.post(f"/api/experiments/{experiment_id}/launch").status_code == 200
        final = federation.wait_for_experiment(experiment_id, timeout=600)
        assert {t["spoke_id"]: t["succeeded"] for t in final["targets"]} == sizes

        # The results are rows of PostgreSQL, one per case.
        engine = create_engine(url)
        with engine.connect() as connection:
            stored = connection.execute(text(
                "SELECT count(*), count(DISTINCT (spoke_id, case_id)) FROM caseresult "
                "WHERE experiment_id = :e"), {"e": experiment_id}).one()
        assert tuple(stored) == (7, 7)

        # A restarted hub finds everything and does not create the schema again.
        federation.processes["hub"].stop()
        federation.start_hub()
        with federation.api() as api:
            report = api.get(f"/api/experiments/{experiment_id}/aggregate").json()
            cases = api.get(f"/api/experiments/{experiment_id}/cases").json()
        assert report["groups"]["pooled"]["cases"] == len(cases) == 7
        with engine.connect() as connection:
            created_events = connection.execute(text(
                "SELECT count(*) FROM auditevent WHERE action = 'hub.schema_created'")).scalar()
        engine.dispose()
        assert created_events == 1
    finally:
        federation.stop()


def test_sign_in_throttle_shared_on_postgres(server: str, tmp_path: Path) -> None:
    """Two throttles on one PostgreSQL database (two web processes' view): failures at
    either count at both, and a correct password clears the user's count for both."""
    url = new_database(server)
    engines = [open_database(HubSettings(database_url=url, audit_log=tmp_path / "audit.jsonl"))
               for _ in range(2)]
    first, second = (SignInThrottle(engine, 60, max_per_user=3, max_per_address=100)
                     for engine in engines)
    first.failed("carol", "10.0.0.1")
    second.failed("Carol", "10.0.0.2")
    assert first.retry_after("carol", "10.0.0.3") is None
    first.failed("carol", "10.0.0.1")
    assert 0 < (second.retry_after("CAROL", "10.0.0.9") or 0) <= 60
    second.succeeded("carol")
    assert first.retry_after("carol", "10.0.0.9") is None
    for engine in engines:
        engine.dispose()


def test_the_training_lease_on_postgres(server: str) -> None:
    """The advisory-lock lease between two real processes on one PostgreSQL database: one
    holder, failover after kill -9, and a holder whose connection the server dropped knows
    it no longer holds the lease (and another process takes it)."""
    url = new_database(server)
    one_holder_and_failover_after_kill_9(url)
    engine = create_engine(url)
    lease = Lease(engine, "training")
    assert lease.try_acquire()
    with engine.connect() as connection:  # the server ends the lease's session
        connection.execute(text(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
            "AND objid = :low"), {"low": lock_key("training") & 0xFFFFFFFF})
    assert not lease.held()
    holder = start_holder(url, "training")  # the lock went with the session
    holder.kill()
    holder.wait(timeout=30)
    engine.dispose()
