"""A request's ε budget on a PostgreSQL hub: launches racing for it, each holding its
spend uncommitted for a while, never spend more than the budget in total; the spends
that fit succeed, the others are refused naming the budget."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

from tributary.hub.db import open_database
from tributary.hub.models import AccessRequest, utcnow
from tributary.hub.services import access_grants
from tributary.hub.settings import HubSettings
from tributary.protocol.cohorts.access import AccessConditions, StudyKind
from tributary.services import postgres
from tributary.services.settings import ServiceSettings

pytestmark = pytest.mark.e2e


def test_racing_launches_never_overspend_on_postgres(service_settings: ServiceSettings,
                                                     tmp_path: Path) -> None:
    server = postgres.ensure_running(service_settings)
    url = postgres.create_database(server, f"hub_{uuid.uuid4().hex[:10]}")
    engine = open_database(HubSettings(database_url=url, audit_log=tmp_path / "audit.jsonl"))
    conditions = AccessConditions(spokes=["north", "south"], study_kinds=[StudyKind.TRAINING],
                                  min_k=2, epsilon_budget=1.0,
                                  expires_at=utcnow() + timedelta(days=1))
    with Session(engine) as session:
        session.add(AccessRequest(id="ar-" + "0" * 12, title="race", purpose="race",
                                  requested_by="carol", spokes=["north", "south"],
                                  study_kinds=["training"], epsilon=1.0, state="approved",
                                  conditions=conditions.model_dump(mode="json"),
                                  decided_at=utcnow()))
        session.commit()
    ask = access_grants.LaunchAsk(kind=StudyKind.TRAINING, spokes=["north", "south"], k=2,
                                  epsilon=0.3)
    launches = 6
    checked, outcomes = threading.Barrier(launches), []
    lock = threading.Lock()

    def one() -> None:
        with Session(engine) as own:
            request = access_grants.check(own, "ar-" + "0" * 12, "carol", ask, True)
            assert request is not None
            checked.wait()  # every launch saw the whole budget left
            try:
                access_grants.spend(own, request, ask.epsilon)
                time.sleep(0.2)  # the spend stays uncommitted while the others try
                own.commit()
                outcome = "spent"
            except access_grants.AccessRefused as exc:
                outcome = exc.condition
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=one) for _ in range(launches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["epsilon_budget"] * 3 + ["spent"] * 3
    with Session(engine) as session:
        spent = session.get(AccessRequest, "ar-" + "0" * 12).epsilon_spent  # type: ignore[union-attr]
    assert spent == pytest.approx(0.9)
    engine.dispose()
