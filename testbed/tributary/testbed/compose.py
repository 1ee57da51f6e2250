"""The federation of ``docker-compose.yml``: the same hub and spokes as
:class:`~tributary.testbed.federation.LocalFederation`, each in its own container.

``docker-compose.yml`` describes the services; this module prepares what it needs (each
role's wheels built on the host, since a container has no package index here; the service
configurations copied from ``tributary/services``; a state folder the containers can reach,
with the right owner) and drives it. Everything above the process level (enrolment, review,
studies) is LocalFederation's own code: only how the hub and the spokes are started differs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tributary.protocol.destinations import DEFAULT_FEDERATION
from tributary.services import base_image, docker_engine
from tributary.services.settings import ServiceSettings
from tributary.services.system import ensure_commands, port_open, wait_for
from tributary.testbed import checkout_wheels, image_wheels
from tributary.testbed.federation import LocalFederation

#: The source checkout: testbed/tributary/testbed/ is three folders below it.
ROOT = Path(__file__).resolve().parents[3]
#: The uid the hub and spoke images run as (deploy/hub/Dockerfile, deploy/spoke/Dockerfile).
CONTAINER_UID = 10001
#: Each role's image (deploy/<role>/) and the folders of the distributions it installs with
#: their dependencies: the protocol (with the SDK, whose contract constants it uses) and the
#: role, nothing of the other role.
ROLES = {"hub": ("algorithm-sdk", "protocol", "hub[postgresql]"),
         "spoke": ("algorithm-sdk", "protocol", "spoke")}
SPOKES = ("northfield", "riverside", "stclare")
#: Folders of the images their unprivileged account cannot enter: a Debian image's /root
#: is mode 700, like the host's.
CLOSED_IN_IMAGES = (Path("/root"),)
#: The containers' state when the usual place is in such a folder (FHS: a service's state).
SYSTEM_STATE = Path("/var/lib/tributary/compose")


def compose_file() -> Path:
    path = ROOT / "docker-compose.yml"
    if not path.exists():
        raise FileNotFoundError("docker-compose.yml is only in a source checkout of Tributary")
    return path


def reachable_in_containers(path: Path) -> bool:
    """Whether the containers' account can reach ``path`` mounted at the same path: Docker
    creates the missing folders above a mount open to all, but an image's own folders keep
    their mode."""
    path = path.resolve()
    return not any(path.is_relative_to(closed) for closed in CLOSED_IN_IMAGES)


def state_folder(settings: ServiceSettings) -> Path:
    """Where ``tributary demo --containers`` keeps the federation's state: beside the other
    services' state, unless that lies in root's home (root on a fresh machine), which
    the containers cannot enter; then in /var/lib, never by opening root's home."""
    usual = (settings.state_dir / "compose").resolve()
    return usual if reachable_in_containers(usual) else SYSTEM_STATE


def build_context(environment: dict[str, str]) -> None:
    """Each role's wheels (its distributions and their dependencies, for the images' marker
    ``environment``) into its build context, ``deploy/<role>/wheels``, and the broker's and
    registry's configurations into theirs."""
    deploy = ROOT / "deploy"
    for role, distributions in ROLES.items():
        wheels = deploy / role / "wheels"
        shutil.rmtree(wheels, ignore_errors=True)  # only this build's set: the image installs all
        wheels.mkdir()
        # A fixed timestamp makes the wheels of unchanged sources identical, so the engine's
        # build cache holds across runs.
        checkout_wheels.build(ROOT, distributions, wheels,
                              env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"})
        image_wheels.complete_for(wheels, environment)
    services = ROOT / "cli" / "tributary" / "services"
    for name, target in (("activemq.xml", "broker"), ("log4j2.properties", "broker"),
                         ("registry.yml", "registry")):
        shutil.copyfile(services / name, deploy / target / name)


@dataclass
class ContainerProcess:
    """A compose service, seen through the interface of a federation Process."""

    name: str
    federation: ComposeFederation

    def alive(self) -> bool:
        container = f"{self.federation.project}_{self.name}_1"  # docker-compose's naming
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", container],
                               capture_output=True, text=True).stdout.strip()
        return state == "true"

    def stop(self, timeout: float = 20) -> None:
        self.federation.compose("stop", "-t", str(int(timeout)), self.name)

    def log_tail(self, lines: int = 30) -> str:
        return self.federation.compose("logs", "--no-color", "--tail", str(lines), self.name,
                                       capture=True)


@dataclass
class ComposeFederation(LocalFederation):
    """Hub, spokes, broker and registry as the containers of ``docker-compose.yml``."""

    project: str = "tributary"
    federation: str = DEFAULT_FEDERATION
    #: A spoke in a container cannot give its cases a quota: it runs unprivileged, and a
    #: tmpfs it mounted would live in its own mount namespace, not at the host path the
    #: engine binds into the algorithm's container (docs/deployment.md).
    output_quota_mb: int | None = 0
    _env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()
        if not reachable_in_containers(self.root):
            raise ValueError(f"the containers cannot reach {self.root} (their image keeps "
                             f"{', '.join(map(str, CLOSED_IN_IMAGES))} closed); choose a "
                             f"folder elsewhere, such as {SYSTEM_STATE}")
        super().__post_init__()
        (self.root / "hub").mkdir(exist_ok=True)
        self._env = {
            "TRIBUTARY_STATE": str(self.root),
            "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
            "TRIBUTARY_HUB_ADMIN_PASSWORD": self.admin_password,
            "TRIBUTARY_HUB_BROKER_FEDERATION": self.federation,
            "BROKER_PORT": str(self.services.broker_port),
            "REGISTRY_PORT": str(self.services.registry_port),
            "HUB_PORT": str(self.hub_port),
            "DEBIAN_IMAGE": self.services.base_image,
            "PYTHON_IMAGE": self.services.base_image,
        }

    @property
    def hub_key_path(self) -> Path:
        return self.root / "hub" / "hub.key"

    @property
    def hub_audit_log(self) -> Path:
        return self.root / "hub" / "hub-audit.jsonl"

    def _env_for_cli(self) -> dict[str, str]:
        return {**os.environ, **self._env}

    def compose(self, *args: str, capture: bool = False) -> str:
        command = ["docker-compose", "-f", str(compose_file()), "-p", self.project, *args]
        result = subprocess.run(command, env=self._env_for_cli(), text=True,
                                capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} failed:\n"
                               f"{result.stdout}{result.stderr}")
        return result.stdout if capture else ""

    def build(self) -> None:
        """Build the four images: broker, registry, hub and spoke (the three spokes share
        one)."""
        ensure_commands({"docker-compose": "docker-compose"})
        docker_engine.ensure_running(self.services)
        base_image.ensure_base_image(self.services)
        build_context(image_wheels.marker_environment(self.services.base_image))
        self.compose("build", "broker", "registry", "hub", "spoke-northfield")

    def start_services(self) -> None:
        """Broker and registry, waiting until both listen."""
        self.compose("up", "-d", "--no-build", "broker", "registry")
        # A JVM on a busy 2-core machine can take minutes to open its ports.
        for service, port in (("broker", self.services.broker_port),
                              ("registry", self.services.registry_port)):
            try:
                wait_for(lambda port=port: port_open(self.services.host, port), 300,
                         f"the {service} container", None)
            except Exception as error:
                logs = self.compose("logs", "--tail", "20", service, capture=True)
                raise RuntimeError(f"{error}\n--- {service} container log ---\n{logs}") \
                    from error

    def _own(self, path: Path) -> None:
        """Give the containers' account the state it writes (they run unprivileged)."""
        for entry in [path, *path.rglob("*")]:
            os.chown(entry, CONTAINER_UID, CONTAINER_UID)

    def _spawn(self, name: str, args: list[str],  # type: ignore[override]
               env: dict[str, str] | None = None, party: str = "") -> ContainerProcess:
        if name == "hub":
            self._own(self.root / "hub")
        else:
            spoke_id = name.removeprefix("spoke-")
            if spoke_id not in SPOKES:
                raise ValueError(f"docker-compose.yml has no service for spoke {spoke_id!r}")
            self._own(self.root / "spokes" / spoke_id)
        self.compose("up", "-d", "--no-build", name)
        process = self.processes[name] = ContainerProcess(name, self)  # type: ignore[assignment]
        return process

    def stop(self) -> None:
        self.compose("down")  # volumes (broker and registry data) are kept

    def wait_running(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ContainerProcess(name, self).alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} is not running:\n"
                                   f"{ContainerProcess(name, self).log_tail()}")
            time.sleep(0.5)
