"""Fixtures for tests that use the real services: the Docker engine, ActiveMQ and the OCI
registry are started (idempotently) once per session by the project's own code.

``make test`` runs the suite on pytest-xdist workers (``--dist loadgroup``): most of an
end-to-end test's time is spent waiting for other processes, so two cores serve more than
one test at a time. Each file is one group, kept on one worker (:class:`FileGroupScheduling`),
so its module fixtures (a federation, a demo run) start once; files that share names outside
their own temporary folders are one group, so they never run at the same time."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

from tributary import services
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, build_and_push

ROOT = Path(__file__).resolve().parents[1]

#: Files that must not run at the same time as each other, by group.
SHARED = {
    # the demo's fixed spoke names, its compose project and its state folder
    "demo": ("test_demo_e2e.py", "test_demo_containers_e2e.py", "test_demo_sigterm_e2e.py"),
}


def xdist_group(path: str) -> str:
    """The group of a test file (a path relative to the checkout): its shared group, or the
    file itself."""
    name = Path(path).name
    for group, files in SHARED.items():
        if name in files:
            return group
    return path


class FileGroupScheduling(LoadScopeScheduling):
    """xdist's scope scheduling with a test file's group as its scope: a group's tests all
    run on one worker, one after another in file order.

    xdist's own ``loadgroup`` names groups by appending ``@group`` to each item's node id,
    which pytest 9 no longer lets a plugin change (``Node.nodeid`` is read-only), so under
    pytest 9 every test was its own group and a file's tests ran on several workers, each
    with its own copy of the file's module fixtures. A scheduler reads the group from the
    node id's path instead."""

    def _split_scope(self, nodeid: str) -> str:
        return xdist_group(nodeid.split("::", 1)[0])


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadgroup`` (what ``make test`` passes) groups by file, see above."""
    if config.getvalue("dist") == "loadgroup":
        return FileGroupScheduling(config, log)
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end files first, whose tests each take seconds to minutes, so the many short
    unit tests fill the workers' ends rather than a long test starting last."""
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
def short_tmp() -> Iterator[Path]:
    """A temporary folder with a short path, for services that put unix sockets in their
    state folder: a socket path is limited to about 100 bytes, which pytest's own folders
    exceed under xdist workers (``.../pytest-of-USER/pytest-N/popen-gwK/test_name0``)."""
    path = Path(tempfile.mkdtemp(prefix="trib-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
