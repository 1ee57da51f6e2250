"""The hub side's services when the parties are on separate hosts
(:class:`tributary.testbed.hosts.Hosts`), all on the hub side's host:

- the federation's PKI (one CA, as ``tributary pki issue`` writes it: the broker's, the
  hub's, the registry's and every party's certificates, all naming the hub address);
- the mutual-TLS broker on the hub address;
- the OCI registry in token mode on the hub side's loopback, behind the registry gateway
  (``tributary hub registry-gateway``, TLS) on the hub address; tokens come from the hub,
  whose settings for it are :attr:`HubSide.hub_env`;
- the S3 object store (``tributary services objectstore``: SeaweedFS, TLS on the hub
  address, its other servers on the hub side's loopback), with one identity per party.

The hub itself is started by :class:`~tributary.testbed.federation.LocalFederation` with
:attr:`HubSide.hub_tls` and :attr:`HubSide.hub_env`, on :attr:`HubSide.hub_port`.

The Docker engine (root namespace) pulls from the gateway over the root link and trusts the
federation CA for it through its ``certs.d`` (written here, removed at the end).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tributary.protocol import https
from tributary.services import federation_pki, objectstore
from tributary.services import registry as registry_service
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

TOKEN_SERVICE = "tributary-registry"
TOKEN_ISSUER = "tributary-hub"


@dataclass
class HubSide:
    """PKI, broker and registry of the hub side. Use as a context manager."""

    hosts: Hosts
    #: The hub side operator's folder: the PKI (``pki/``: CA, broker configuration, every
    #: party's identity, server certificates), the registry's data and configuration.
    root: Path
    spoke_ids: list[str]
    #: This machine's services (Docker engine, base image); its registry is not used.
    services: ServiceSettings = field(default_factory=ServiceSettings)
    #: The hub's port (published here; the gateway forwards token requests to it).
    hub_port: int = 0
    broker: BrokerSecurityBundle | None = None
    #: The hub's HTTPS certificate (for ``LocalFederation(hub_tls=...)``).
    hub_tls: HubTls | None = None
    #: The hub's registry settings (for ``LocalFederation(hub_env=...)``).
    hub_env: dict[str, str] = field(default_factory=dict)
    registry_port: int = 0
    objectstore_port: int = 0
    #: The object store's state: a short path of its own (SeaweedFS puts unix sockets there).
    _store_dir: Path | None = None
    _processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    _trusted: list[Path] = field(default_factory=list)

    @property
    def ca_file(self) -> Path:
        """The federation CA: the one trust anchor of every hop."""
        return self.root / "pki" / "pki" / "ca.crt"

    @property
    def registry(self) -> str:
        return f"{self.hosts.hub_address}:{self.registry_port}"

    @property
    def settings(self) -> ServiceSettings:
        """The services as the parties see them: the registry is the hub side's."""
        return self.services.model_copy(update={"host": self.hosts.hub_address,
                                                "registry_port": self.registry_port})

    @property
    def store(self) -> ServiceSettings:
        """The object store's settings on the hub host."""
        if self._store_dir is None:
            self._store_dir = Path(tempfile.mkdtemp(prefix="tributary-s3-"))
        return ServiceSettings(state_dir=self._store_dir,
                               host=self.hosts.hub_address,
                               objectstore_port=self.objectstore_port)

    def spoke_objectstore(self, spoke_id: str, folder: Path) -> Path:
        """The spoke's object-store credentials (and the CA), copied into its own ``folder``
        as its administrator would receive them; the copied credentials file."""
        folder.mkdir(parents=True, exist_ok=True)
        identity = federation_pki.spoke_identity_dir(self.root / "pki", spoke_id)
        shutil.copyfile(identity / "ca.crt", folder / "ca.crt")
        return Path(shutil.copyfile(identity / "objectstore.json", folder / "objectstore.json"))

    def spoke_registry(self, folder: Path) -> dict[str, str]:
        """A spoke's ``[registry]`` table, with its own copy of the CA in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        ca = shutil.copyfile(self.ca_file, folder / "registry-ca.crt")
        return {"ca_file": str(ca), "token_service": TOKEN_SERVICE}

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
        hub = self.hosts.hub_address
        broker_port, self.registry_port = free_port(), free_port()
        self.objectstore_port = free_port()
        self.hub_port = self.hub_port or free_port()
        self.hosts.publish(broker_port, self.registry_port, self.hub_port,
                           self.objectstore_port)
        pki_dir = self.root / "pki"
        federation_pki.issue(pki_dir, hub_names=[hub], spokes=self.spoke_ids,
                             broker_host=hub, broker_port=broker_port, store=self.store)
        self.broker = load_bundle(pki_dir)
        self.hub_tls = HubTls(pki_dir / "hub" / "server.crt", pki_dir / "hub" / "server.key",
                              self.ca_file)
        signer = pki_dir / federation_pki.TOKEN_SIGNER_DIR
        self.hub_env = {"TRIBUTARY_HUB_REGISTRY_TOKEN_KEY": str(signer / "client.key"),
                        "TRIBUTARY_HUB_REGISTRY_TOKEN_CERT": str(signer / "client.crt"),
                        "TRIBUTARY_HUB_REGISTRY_TOKEN_SERVICE": TOKEN_SERVICE,
                        "TRIBUTARY_HUB_REGISTRY_TOKEN_ISSUER": TOKEN_ISSUER,
                        "TRIBUTARY_HUB_REGISTRY_CA_FILE": str(self.ca_file)}
        start_broker(self.broker, command_prefix=self.hosts.command(HUB))
        self._start_registry()
        self._start_objectstore()

    def _start_objectstore(self) -> None:
        """Started as an operator would, on the hub's host; SeaweedFS stays there."""
        store = self.store
        env = {**os.environ, "TRIBUTARY_STATE_DIR": str(store.state_dir),
               "TRIBUTARY_HOST": store.host,
               "TRIBUTARY_OBJECTSTORE_PORT": str(store.objectstore_port)}
        done = self.hosts.run(HUB, [sys.executable, "-m", "tributary.cli", "services",
                                    "objectstore", "--pki", str(self.root / "pki")],
                              env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ServiceError(f"the hub side's object store did not start: "
                               f"{done.stdout}{done.stderr}")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[Any]:
        with open(self.root / "registry" / f"{name}.log", "ab") as log:
            process = self.hosts.spawn(HUB, argv, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        self._processes.append(process)
        return process

    def _start_registry(self) -> None:
        folder, hub = self.root / "registry", self.hosts.hub_address
        (folder / "data").mkdir(parents=True, exist_ok=True)
        internal, realm = free_port(), f"https://{self.registry}/token"
        template = resources.files("tributary.services").joinpath("registry-token.yml")
        config = folder / "config.yml"
        config.write_text(
            template.read_text().replace("@DATA@", str(folder / "data"))
            .replace("@PORT@", str(internal)).replace("@REALM@", realm)
            .replace("@SERVICE@", TOKEN_SERVICE).replace("@ISSUER@", TOKEN_ISSUER)
            .replace("@ROOTS@", str(self.ca_file)))
        # The registry on the hub side's loopback; the gateway on the hub address.
        self._spawn("registry", ["docker-registry", "serve", str(config)])
        server = self.root / "pki" / "registry"
        self._spawn("gateway", [
            sys.executable, "-m", "tributary.cli", "hub", "registry-gateway",
            "--cert", str(server / "server.crt"), "--key", str(server / "server.key"),
            "--upstream", f"http://127.0.0.1:{internal}", "--roots", str(self.ca_file),
            "--realm", realm, "--hub-url", f"https://{hub}:{self.hub_port}",
            "--hub-ca-file", str(self.ca_file), "--issuer", TOKEN_ISSUER,
            "--service", TOKEN_SERVICE, "--host", hub, "--port", str(self.registry_port)])
        # The machine's container engine (and Podman) trust the federation CA for it.
        self._trusted = registry_service.trust_ca(self.registry, self.ca_file)
        deadline = time.monotonic() + 30
        while True:
            try:
                with https.client(f"https://{self.registry}", self.ca_file, timeout=2) as c:
                    if c.get("/v2/").status_code == 401:  # a token is needed: both are up
                        return
            except httpx.HTTPError:
                pass
            if any(p.poll() is not None for p in self._processes) \
                    or time.monotonic() > deadline:
                logs = "\n".join(f.read_text(errors="replace") for f in folder.glob("*.log"))
                raise ServiceError(f"the hub side's registry did not start:\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        for process in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._processes.clear()
        if self.broker is not None:
            stop_broker(self.broker)
        if self._store_dir is not None:
            objectstore.stop(self.store)
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None
        for path in self._trusted:
            shutil.rmtree(path.parent, ignore_errors=True)
        self._trusted.clear()
        if self.registry_port:
            forget_registry_images(self.registry)


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
