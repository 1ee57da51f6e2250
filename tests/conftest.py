"""Fixtures for tests that use the real services: the Docker engine, ActiveMQ and the OCI
registry are started (idempotently) once per session by the project's own code."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tributary import services
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, build_and_push

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def service_settings() -> ServiceSettings:
    settings = ServiceSettings()
    services.up(settings)
    return settings


@pytest.fixture(scope="session")
def detector_image(service_settings: ServiceSettings) -> tuple[str, str]:
    return build_and_push(ROOT / "examples" / "lung_nodule", "lung-nodule", "1.0.0",
                          service_settings)


@pytest.fixture(scope="session")
def misbehaving_image(service_settings: ServiceSettings) -> tuple[str, str]:
    return build_and_push(ROOT / "tests" / "algorithms" / "misbehaving", "misbehaving",
                          "1.0.0", service_settings)


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory,
               service_settings: ServiceSettings) -> Iterator[LocalFederation]:
    fed = LocalFederation(tmp_path_factory.mktemp("federation"), service_settings)
    fed.start_hub()
    yield fed
    fed.stop()


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_checkout() -> Iterator[None]:
    """A hub on a server database without TRIBUTARY_HUB_AUDIT_LOG logs to its working
    folder: tests must configure one, or their runs' logs end up in the repository."""
    stray = ROOT / "tributary-hub-audit.jsonl"
    existed = stray.exists()
    yield
    assert existed or not stray.exists(), f"a test wrote {stray.name} into the checkout"


@pytest.fixture
def unique() -> str:
    """A short suffix that keeps spoke queues of different test runs apart."""
    return uuid.uuid4().hex[:6]
