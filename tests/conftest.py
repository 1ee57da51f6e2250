"""Fixtures for tests that use the real services: the Docker engine, ActiveMQ and the OCI
registry are started (idempotently) once per session by the project's own code.

``make test`` runs the suite on pytest-xdist workers (``--dist loadgroup``): most of an
end-to-end test's time is spent waiting for other processes, so two cores serve more than
one test at a time. Each file is one group, kept on one worker, so its module fixtures (a
federation, a demo run) start once; files that share names outside their own temporary
folders are one group, so they never run at the same time."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tributary import services
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, build_and_push

ROOT = Path(__file__).resolve().parents[1]

#: Files that must not run at the same time as each other, by group.
SHARED = {
    # the demo's fixed spoke names, its compose project and its state folder
    "demo": ("test_demo_e2e.py", "test_demo_containers_e2e.py", "test_demo_sigterm_e2e.py"),
}


def xdist_group(path: Path) -> str:
    """The xdist group of a test file: its shared group, or the file itself."""
    for group, files in SHARED.items():
        if path.name in files:
            return group
    return str(path.relative_to(ROOT))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group each test by file; end-to-end files first, whose tests each take seconds to
    minutes, so the many short unit tests fill the workers' ends rather than a long test
    starting last."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group(Path(item.path))))
    items.sort(key=lambda item: "/tests/e2e/" not in str(item.path))  # stable


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


@pytest.fixture(scope="session")
def training_image(service_settings: ServiceSettings) -> tuple[str, str]:
    """The federated example (examples/federated_logreg) built FROM the services' base image
    and pushed to the registry: (repository, manifest digest)."""
    from tributary.testbed.training_demo import push_training_image

    return push_training_image(service_settings)
