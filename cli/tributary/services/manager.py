"""Bring the whole local infrastructure up or down, in dependency order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tributary.services import (
    base_image,
    broker,
    docker_engine,
    objectstore,
    ocr,
    podman,
    postgres,
    redis,
    registry,
    slurm,
)
from tributary.services.settings import ServiceSettings


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    detail: str


def up(settings: ServiceSettings | None = None,
       report: Callable[[str, str], None] = lambda name, state: None) -> None:
    """Start everything that is not running yet; safe to call again and again."""
    settings = settings or ServiceSettings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    report("docker", docker_engine.ensure_running(settings))
    report("activemq", broker.ensure_running(settings))
    report("registry", registry.ensure_running(settings))
    report("base-image", base_image.ensure_base_image(settings))
    report("tesseract", ocr.ensure_tesseract())
    # Models and masked updates of federated training (docs/training.md); hub-only
    # identities until `tributary pki issue --objectstore` adds the spokes'.
    report("objectstore", f"{objectstore.ensure_running(settings)} at "
                          f"{objectstore.endpoint(settings)}")


def down(settings: ServiceSettings | None = None,
         report: Callable[[str, str], None] = lambda name, state: None) -> None:
    """Stop what this project started; leave a system-provided Docker engine alone."""
    settings = settings or ServiceSettings()
    report("slurm", "stopped" if slurm.stop(settings) else "was not running")
    report("podman", "stopped" if podman.stop(settings) else "was not running")
    report("podman-rootless",
           "stopped" if podman.stop_rootless(settings) else "was not running")
    report("objectstore", "stopped" if objectstore.stop(settings) else "was not running")
    report("postgres", "stopped" if postgres.stop(settings) else "was not running")
    report("redis", "stopped" if redis.stop(settings) else "was not running")
    report("registry", "stopped" if registry.stop(settings) else "was not running")
    report("activemq", "stopped" if broker.stop(settings) else "was not running")
    report("docker", "stopped" if docker_engine.stop(settings) else "left as it was")


def status(settings: ServiceSettings | None = None) -> list[ServiceStatus]:
    settings = settings or ServiceSettings()
    rows = [
        ("docker", *docker_engine.describe(settings)),
        ("activemq", *broker.describe(settings)),
        ("registry", *registry.describe(settings)),
        ("objectstore", *objectstore.describe(settings)),
    ]
    engine_up = rows[0][1]
    present = engine_up and base_image.image_exists(settings.base_image)
    rows.append(("base-image", present, settings.base_image if present else "missing"))
    return [ServiceStatus(name, running, detail) for name, running, detail in rows]
