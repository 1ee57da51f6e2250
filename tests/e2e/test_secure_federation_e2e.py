"""A study through the broker that `tributary broker config` generates: real hub and spoke
processes connect with their own certificates and identities over mutual TLS, and the
per-queue authorization lets exactly the traffic the protocol needs through."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tributary.services.broker_security import (
    BrokerSecurityBundle,
    generate_broker_config,
    start_broker,
    stop_broker,
)
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, service_settings: ServiceSettings
           ) -> Iterator[tuple[BrokerSecurityBundle, list[str], Path]]:
    root = tmp_path_factory.mktemp("secure")
    spokes = [f"tls-{uuid.uuid4().hex[:6]}", f"tls-{uuid.uuid4().hex[:6]}"]
    bundle = generate_broker_config(root / "broker", spoke_ids=spokes,
                                    stomp_ssl_port=free_port())
    start_broker(bundle)
    yield bundle, spokes, root
    stop_broker(bundle)


def test_study_over_mutual_tls_broker(secure: tuple[BrokerSecurityBundle, list[str], Path],
                                      service_settings: ServiceSettings,
                                      misbehaving_image: tuple[str, str]) -> None:
    bundle, spokes, root = secure
    federation = LocalFederation(root / "federation", service_settings, secure_broker=bundle)
    try:
        federation.start_hub()
        for index, spoke_id in enumerate(spokes):
            data = federation.root / "data" / spoke_id
            generate_cohort(data, 2, seed=40 + index, site=spoke_id)
            federation.start_spoke(spoke_id, federation.add_spoke(spoke_id, data))
        algorithm = federation.register_algorithm(
            name="tls-ok", version="1", repository=misbehaving_image[0],
            digest=misbehaving_image[1])
        with federation.api() as api:
            exp = api.post("/api/experiments", json={
                "name": "over mTLS", "algorithm_id": algorithm["id"], "spoke_ids": spokes,
                "arguments": {"behaviour": "ok"}}).raise_for_status().json()
            api.post(f"/api/experiments/{exp['id']}/launch").raise_for_status()
        final = federation.wait_for_experiment(exp["id"], timeout=180)
        assert [t["succeeded"] for t in final["targets"]] == [2, 2]
        for process in federation.processes.values():
            assert "not authorized" not in process.log.read_text()
    finally:
        federation.stop()
