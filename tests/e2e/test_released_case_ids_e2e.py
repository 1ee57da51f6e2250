"""Case ids that leave a spoke are scoped to the study: the same patient gets unrelated ids
in two studies, the catalog's own pseudonym never crosses the broker, and a retry the hub
sends with a released id still reaches the right case. A real spoke process, real
containers, the real broker; the test reads the results queue as the hub would."""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_spoke_durability_e2e import HubListener, add_spoke, hub_publish, wait_for

from tributary.protocol.messages import (
    AlgorithmRef,
    ExperimentMessage,
    ExperimentStatusMessage,
    ResultMessage,
    RetryCasesMessage,
    RunLimits,
)
from tributary.protocol.release import sign_approval
from tributary.protocol.signing import SigningKey
from tributary.services.settings import ServiceSettings
from tributary.spoke.case_ids import ReleasedCaseIds
from tributary.spoke.journal import Journal
from tributary.testbed.federation import LocalFederation

pytestmark = pytest.mark.e2e


def test_released_ids_are_keyed_by_study_and_site(tmp_path: Path) -> None:
    ids = ReleasedCaseIds.from_key_file(tmp_path / "case-id.key", "site-a")
    same_key = ReleasedCaseIds((tmp_path / "case-id.key").read_bytes(), "site-a")
    other_site = ReleasedCaseIds((tmp_path / "case-id.key").read_bytes(), "site-b")
    other_key = ReleasedCaseIds.from_key_file(tmp_path / "other.key", "site-a")
    released = ids.released("study-1", "c-0123456789abcdef")
    assert released == same_key.released("study-1", "c-0123456789abcdef")  # stable
    assert released != ids.released("study-2", "c-0123456789abcdef")
    assert released != other_site.released("study-1", "c-0123456789abcdef")
    assert released != other_key.released("study-1", "c-0123456789abcdef")
    assert "0123456789abcdef" not in released
    assert (tmp_path / "case-id.key").stat().st_mode & 0o777 == 0o600


def _decoded(body: bytes) -> str:
    """The message and every base64 payload inside it (signed envelopes, custody), as text."""
    texts = [body.decode(errors="replace")]

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "payload" and isinstance(item, str):
                    try:
                        inner = base64.b64decode(item)
                    except ValueError:
                        continue
                    texts.append(_decoded(inner))
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and value.startswith("{"):
            with contextlib.suppress(ValueError):
                walk(json.loads(value))

    with contextlib.suppress(ValueError):
        walk(json.loads(body))
    return "\n".join(texts)


def test_same_patient_unlinkable_across_studies_and_retry_reaches_it(
        tmp_path: Path, service_settings: ServiceSettings,
        misbehaving_image: tuple[str, str]) -> None:
    federation = LocalFederation(tmp_path / "fed", service_settings)
    hub_key = SigningKey.load_or_create(federation.hub_key_path)
    spoke_id, config = add_spoke(federation, "scoped", cases=2, concurrency=2)
    spoke_key = SigningKey.load_or_create(config.parent / "spoke.key")
    listener = HubListener(federation, spoke_id, spoke_key)
    repository, digest = misbehaving_image
    algorithm = AlgorithmRef(name="misbehaving", version="1", repository=repository,
                             digest=digest, approval=sign_approval(
                                 hub_key, repository, digest, {"name": "misbehaving"}))

    def experiment(behaviour: str) -> ExperimentMessage:
        return ExperimentMessage(
            experiment_id=f"exp-{uuid.uuid4().hex[:8]}", spoke_id=spoke_id,
            algorithm=algorithm, arguments={"behaviour": behaviour},
            limits=RunLimits(timeout_seconds=120, memory_mb=256))

    def results(experiment_id: str, count: int) -> list[ResultMessage]:
        return wait_for(lambda: (lambda rs: rs if len(rs) >= count else [])(
            [r for r in listener.of(ResultMessage) if r.experiment_id == experiment_id]),
            180, f"{count} results of {experiment_id}")

    first, second, echo = experiment("exit-code"), experiment("ok"), experiment("echo-patient")
    try:
        federation.start_spoke(spoke_id, config)
        hub_publish(federation, first)
        hub_publish(federation, second)
        hub_publish(federation, echo)
        first_results, second_results = results(first.experiment_id, 2), \
            results(second.experiment_id, 2)
        # An algorithm copying PatientID from its input's headers (the store's case
        # pseudonym) into its output: the output is not released.
        echoed = results(echo.experiment_id, 2)
        assert {(r.status, r.failure.reason if r.failure else None) for r in echoed} == {
            ("failed", "invalid_output")}
        assert all(r.output is None for r in echoed)
        first_ids = {r.case_id for r in first_results}
        second_ids = {r.case_id for r in second_results}
        assert len(first_ids) == len(second_ids) == 2
        assert not first_ids & second_ids, "a patient's ids must not link two studies"

        # The hub retries one failed case by the id it was given: the same case runs again.
        retried = sorted(first_ids)[0]
        hub_publish(federation, RetryCasesMessage(
            experiment_id=first.experiment_id, spoke_id=spoke_id, case_ids=[retried],
            attempt=2, reason="try again"))
        again = wait_for(lambda: [r for r in listener.of(ResultMessage)
                                  if r.experiment_id == first.experiment_id
                                  and r.attempt == 2], 180, "the retried case's result")
        assert [r.case_id for r in again] == [retried]
        assert not [s for s in listener.of(ExperimentStatusMessage)
                    if s.state == "retry_refused"]

        # The catalog's pseudonyms are in the spoke's journal mapping, and nowhere on the wire.
        journal = Journal(config.parent / "journal.db")
        try:
            mapping = {**journal.released_cases(first.experiment_id),
                       **journal.released_cases(second.experiment_id)}
        finally:
            journal.close()
        assert set(mapping) == first_ids | second_ids
        catalog_ids = set(mapping.values())
        with sqlite3.connect(config.parent / "catalog.db") as db:
            assert catalog_ids == {r[0] for r in db.execute("SELECT case_id FROM cases")}
        assert len(catalog_ids) == 2
        with sqlite3.connect(config.parent / "catalog.db") as db:
            store_series = {r[0] for r in db.execute("SELECT series_id FROM series")}
        # The algorithm is given study-scoped series ids too: the store's series pseudonym
        # would link the patient across studies as well, if an algorithm echoed it.
        given: dict[str, set[str]] = {first.experiment_id: set(), second.experiment_id: set()}
        for experiment_id, released in [(first.experiment_id, r) for r in first_ids] + \
                [(second.experiment_id, r) for r in second_ids]:
            participant = json.loads((config.parent / "runs" / experiment_id / released /
                                      "participant.json").read_text())
            assert participant["case_id"] == released
            given[experiment_id] |= {s["series_id"] for s in participant["series"]}
        assert given[first.experiment_id] and given[second.experiment_id]
        assert not given[first.experiment_id] & given[second.experiment_id]
        assert not (given[first.experiment_id] | given[second.experiment_id]) & store_series
        traffic = "\n".join(_decoded(body) for body in listener.bodies)
        assert len(listener.bodies) >= 7  # statuses, results, heartbeats crossed the broker
        for catalog_id in catalog_ids | store_series:
            assert catalog_id not in traffic, f"catalog pseudonym {catalog_id} left the spoke"
        for released in first_ids | second_ids:
            assert released in traffic
    finally:
        federation.stop()
        listener.close()
