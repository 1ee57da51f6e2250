"""The hub side's services when the parties are on separate hosts
(:class:`tributary.testbed.hosts.Hosts`): the federation's PKI (one CA, ``tributary pki
issue``: the broker's, the hub's HTTPS and every party's certificates, all naming the hub
address), the mutual-TLS broker and an OCI registry of the federation's own, both started
in the hub side's namespace, their ports published on the hub address. The hub itself is
started by :class:`~tributary.testbed.federation.LocalFederation` with :attr:`HubSide.hub_tls`.

The registry is still plain HTTP. The Docker engine (root namespace) trusts only loopback
registries without TLS, so the root namespace's ``127.0.0.1:PORT`` is relayed over the
root link to the registry on the hub side (:meth:`Hosts.relay_from_root`), and the hub,
on the registry's own host, reaches it on its loopback: images are named
``127.0.0.1:PORT/...`` everywhere.

TODO(issue 12, registry gateway): once the TLS registry gateway is merged, serve it on
``hub_address:PORT`` with a certificate naming the hub address, have the engine trust the
federation CA for it (``/etc/docker/certs.d/HUB:PORT/ca.crt``, read at each pull), drop
the relay, and make :attr:`HubSide.settings` name the registry ``HUB:PORT``.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tributary.services import federation_pki
from tributary.services.broker_security import (
    BrokerSecurityBundle,
    load_bundle,
    start_broker,
    stop_broker,
)
from tributary.services.settings import ServiceSettings
from tributary.services.system import ServiceError, free_port
from tributary.testbed.federation import HubTls
from tributary.testbed.hosts import HUB, Hosts


@dataclass
class HubSide:
    """Broker and registry on the hub side. Use as a context manager."""

    hosts: Hosts
    #: The hub side operator's folder: the PKI (``pki/``: CA, broker configuration, every
    #: party's identity, server certificates), the registry's data.
    root: Path
    spoke_ids: list[str]
    #: This machine's services (Docker engine, base image); its registry is not used.
    services: ServiceSettings = field(default_factory=ServiceSettings)
    broker: BrokerSecurityBundle | None = None
    #: The hub's HTTPS certificate (for ``LocalFederation(hub_tls=...)``).
    hub_tls: HubTls | None = None
    registry_port: int = 0
    _registry: subprocess.Popen[Any] | None = None

    @property
    def settings(self) -> ServiceSettings:
        """The services as the parties see them: the registry is the hub side's."""
        return self.services.model_copy(update={"registry_port": self.registry_port})

    def __enter__(self) -> HubSide:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        broker_port, self.registry_port = free_port(), free_port()
        self.hosts.publish(broker_port, self.registry_port)
        pki_dir = self.root / "pki"
        federation_pki.issue(pki_dir, hub_names=[self.hosts.hub_address], spokes=self.spoke_ids,
                             broker_host=self.hosts.hub_address, broker_port=broker_port)
        self.broker = load_bundle(pki_dir)
        hub = pki_dir / "hub"
        self.hub_tls = HubTls(hub / "server.crt", hub / "server.key", hub / "ca.crt")
        start_broker(self.broker, command_prefix=self.hosts.command(HUB))
        self._start_registry()

    def _start_registry(self) -> None:
        folder = self.root / "registry"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        config = folder / "config.yml"
        template = resources.files("tributary.services").joinpath("registry.yml").read_text()
        # Every address of the hub side: the hub address (published) and its loopback,
        # where the hub, on the same host, reaches it.
        config.write_text(template.replace("@DATA@", str(folder / "data"))
                          .replace("@HOST@", "0.0.0.0").replace("@PORT@", str(self.registry_port)))
        with open(folder / "registry.log", "ab") as log:
            self._registry = self.hosts.spawn(HUB, ["docker-registry", "serve", str(config)],
                                              stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL)
        self.hosts.relay_from_root(self.registry_port)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.registry_port}/v2/",
                             timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self._registry.poll() is not None or time.monotonic() > deadline:
                raise ServiceError("the hub side's registry did not start:\n"
                                   + (folder / "registry.log").read_text(errors="replace"))
            time.sleep(0.2)

    def stop(self) -> None:
        if self._registry is not None and self._registry.poll() is None:
            self._registry.terminate()
            try:
                self._registry.wait(10)
            except subprocess.TimeoutExpired:
                self._registry.kill()
                self._registry.wait()
        if self.broker is not None:
            stop_broker(self.broker)
        if self.registry_port:
            forget_registry_images(f"127.0.0.1:{self.registry_port}")


def forget_registry_images(registry: str) -> None:
    """Remove the engine's references (tags and digests) to images of ``registry``,
    which pushes and pulls through it left; an image itself goes only if nothing else
    names it. The registry's port is new each run, so they would pile up."""
    import docker
    import docker.errors

    client = docker.from_env()
    try:
        for image in client.images.list():
            for ref in [*image.tags, *(image.attrs.get("RepoDigests") or [])]:
                if ref.startswith(f"{registry}/"):
                    with contextlib.suppress(docker.errors.APIError):
                        client.images.remove(ref)
    finally:
        client.close()
