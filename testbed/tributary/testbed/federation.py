"""A whole federation on one machine, as real processes: one hub and several spokes,
talking through the real broker, pulling from the real registry and running real
containers. The demo and the end-to-end tests both drive it, so what the tests prove is
what a person sees.

With ``hosts`` (a :class:`tributary.testbed.hosts.Hosts`), every party runs on its own
simulated host: the hub in the hub side's namespace, listening on the hub address, each
spoke in its own namespace; and no folder is shared: the hub's files are under ``hub/``,
each spoke's under ``spokes/<id>/`` with its own copies of what it is handed (its broker
identity, the hub's public key; the hub its HTTPS certificate). Without, everything runs on
loopback as before."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tributary.protocol import https
from tributary.protocol.destinations import DEFAULT_FEDERATION
from tributary.services.broker_security import Identity
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.testbed.containerwatch import ContainerWatch
from tributary.testbed.hosts import HUB, Hosts

REPO_ROOT = Path(__file__).resolve().parents[3]  # testbed/tributary/testbed/
EXAMPLES = REPO_ROOT / "examples"


def examples_dir() -> Path:
    if not (EXAMPLES / "lung_nodule").is_dir():
        raise FileNotFoundError("the examples/ folder of a Tributary checkout is needed here")
    return EXAMPLES


def build_and_push(algorithm_dir: Path, name: str, version: str,
                   services: ServiceSettings, username: str | None = None,
                   password: str | None = None) -> tuple[str, str]:
    """Build an algorithm image FROM the local base image and push it to the local
    registry (as the hub account ``username`` to a token-protected one); returns
    (repository, manifest digest)."""
    from tributary_algorithm.tools.build import build_image
    from tributary_algorithm.tools.push import push_image

    tag = f"tributary/{name}:{version}"
    build_image(algorithm_dir, tag, base_image=services.base_image,
                wheel_cache=services.state_dir / "wheels")
    return push_image(tag, f"{services.registry}/tributary/{name}:{version}",
                      username=username, password=password)


def generate_cohort(out: Path, cases: int, seed: int, site: str, size: int = 160,
                    slices: int = 40, scanner: int | None = None) -> dict[str, Any]:
    """Synthetic CT cohort with ground truth, written by the example generator; ``scanner``
    (e.g. the site's index) gives the site its own scanner, so sites are not IID."""
    if out.exists():
        shutil.rmtree(out)
    subprocess.run(
        [sys.executable, str(examples_dir() / "synthetic_ct" / "generate.py"), "--out", str(out),
         "--cases", str(cases), "--seed", str(seed), "--site", site, "--size", str(size),
         "--slices", str(slices), *([] if scanner is None else ["--scanner", str(scanner)])],
        check=True, capture_output=True,
    )
    return json.loads((out / "ground_truth.json").read_text())


def execution_toml(engine: str, services: ServiceSettings, poll_seconds: float = 0.5) -> str:
    """The ``[execution]`` tables of a spoke running its cases on ``engine`` ("docker",
    "podman" or "slurm") with this machine's services (`tributary services podman` /
    `slurm`, started here if they are not running)."""
    from tributary.services import podman, slurm

    if engine == "docker":
        return ""
    text = f'\n[execution]\nengine = "{engine}"\n'
    socket = podman.ensure_running(services)
    if engine == "podman":
        text += f"podman_socket = {json.dumps(socket)}\n"
    elif engine == "slurm":
        conf = slurm.ensure_running(services)
        env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in podman.environment(services).items())
        text += (f"\n[execution.slurm]\nslurm_conf = {json.dumps(conf)}\n"
                 f"partition = {json.dumps(slurm.PARTITION)}\npoll_seconds = {poll_seconds}\n"
                 f"podman_env = {{ {env} }}\n")
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return text


def _toml_table(name: str, values: dict[str, Any] | None) -> str:
    """A flat TOML table of booleans and numbers (JSON spells them the TOML way)."""
    if not values:
        return ""
    return f"\n[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class HubTls:
    """The hub's HTTPS certificate and key, and the CA its clients verify it with."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    @classmethod
    def issue(cls, directory: Path, hosts: tuple[str, ...] = ("127.0.0.1",)) -> HubTls:
        """A CA of its own in ``directory`` and a server certificate for ``hosts``
        (plus 127.0.0.1 and localhost)."""
        from tributary.services import pki

        ca = pki.ensure_ca(directory / "ca", common_name="Tributary test hub CA")
        issued = pki.issue_server_cert(ca, directory, list(hosts))
        return cls(issued.cert_path, issued.key_path, ca.cert_path)


def poll(api: httpx.Client, path: str) -> Any:
    """``GET path`` for a polling loop. A pooled connection that the hub closed while the
    loop slept (its keep-alive ran out on a loaded machine) fails the next request with a
    reset or an empty answer: the GET is asked again, once, on a new connection."""
    try:
        return api.get(path).raise_for_status().json()
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        return api.get(path).raise_for_status().json()


def wait_for_trust(api: httpx.Client, spoke_ids: list[str], timeout: float = 60,
                   keyid: str | None = None) -> None:
    """Poll ``GET /api/spokes`` until each spoke reported its publisher trust (and, with
    ``keyid``, trusts that key)."""
    deadline = time.monotonic() + timeout
    while True:
        spokes = {s["id"]: s for s in poll(api, "/api/spokes")}
        waiting = [s for s in spoke_ids if spokes.get(s, {}).get("trust_reported_at") is None
                   or (keyid is not None
                       and keyid not in (spokes[s].get("trusted_publishers") or []))]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no trust report from {', '.join(waiting)} after "
                               f"{timeout:.0f} s")
        time.sleep(0.3)


@dataclass
class LocalFederation:
    root: Path
    services: ServiceSettings = field(default_factory=ServiceSettings)
    hub_port: int = 0
    processes: dict[str, Process] = field(default_factory=dict)
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    admin_token: str = ""
    #: A broker generated by `tributary broker config` (mutual TLS, one identity per party);
    #: None: the plain loopback broker of `tributary services up`.
    secure_broker: Any = None
    #: Queue namespace; a fresh one per federation so that federations sharing one broker
    #: (parallel test runs, say) never consume each other's messages.
    federation: str = field(default_factory=lambda: f"t{secrets.token_hex(6)}")
    #: Extra ``TRIBUTARY_HUB_*`` settings for the hub process (e.g. a short liveness window).
    hub_env: dict[str, str] = field(default_factory=dict)
    #: The hub's ``launch_trust_check``. ``off`` here by default, so tests of the spokes'
    #: own refusals reach the spokes; the demo and the trust tests use ``strict``.
    launch_trust_check: str = "off"
    #: ``[runner] output_quota_mb`` of the spokes it configures; None keeps the default.
    output_quota_mb: int | None = None
    #: Serve the hub over HTTPS with this certificate; its clients here verify it with the CA.
    hub_tls: HubTls | None = None
    #: Simulated hosts to place the parties on (the secure broker must then listen on
    #: ``hosts.hub_address``); None: every process on this machine's loopback.
    hosts: Hosts | None = None
    #: Run a federation authority (in ``root/authority``) that the hub trusts: every spoke
    #: added gets a membership credential, presented with its key at enrolment.
    credentials: bool = False
    authority: Any = None
    _reviewers: list[str] = field(default_factory=list)
    #: (username, password, organisation) of the reviewers :meth:`reviewer_tokens` made.
    _reviewer_accounts: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def hub_dir(self) -> Path:
        """The hub's own files (key, database, audit log, broker identity)."""
        return self.root / "hub" if self.hosts is not None else self.root

    @property
    def hub_key_path(self) -> Path:
        return self.hub_dir / "hub.key"

    @property
    def hub_audit_log(self) -> Path:
        return self.hub_dir / "hub-audit.jsonl"

    @property
    def hub_address(self) -> str:
        return self.hosts.hub_address if self.hosts is not None else "127.0.0.1"

    @property
    def hub_url(self) -> str:
        scheme = "http" if self.hub_tls is None else "https"
        return f"{scheme}://{self.hub_address}:{self.hub_port}"

    @property
    def hub_ca(self) -> Path | None:
        """The CA that clients verify the hub's certificate with (None: plain HTTP)."""
        return None if self.hub_tls is None else self.hub_tls.ca_file

    def client(self, **kwargs: Any) -> httpx.Client:
        """An HTTP client of the hub, verifying its certificate when it serves HTTPS."""
        return https.client(self.hub_url, self.hub_ca, **{"timeout": 30, **kwargs})

    def api(self, token: str | None = None) -> httpx.Client:
        """An API client signed in as the federation's administrator (or with ``token``)."""
        return self.client(headers={"Authorization": f"Bearer {token or self.admin_token}"})

    def sign_in(self, username: str, password: str) -> str:
        with self.client() as client:
            response = client.post("/api/auth/token",
                                   json={"username": username, "password": password})
        response.raise_for_status()
        return str(response.json()["access_token"])

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None,
               party: str = "") -> Process:
        """Start ``tributary ARGS``; with hosts, on ``party``'s host."""
        log = self.root / "logs" / f"{name}.log"
        handle = open(log, "ab")  # noqa: SIM115 - owned by the child process
        command = [sys.executable, "-m", "tributary.cli", *args]
        if self.hosts is not None and party:
            command = self.hosts.command(party, command)
        popen = subprocess.Popen(
            command, stdout=handle,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )
        handle.close()
        process = self.processes[name] = Process(name, popen, log)
        return process

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.hub_port = self.hub_port or free_port()
        if self.hosts is not None:
            if self.secure_broker is None or self.secure_broker.host != self.hosts.hub_address:
                raise ValueError("parties on separate hosts need the mutual-TLS broker on "
                                 "the hub side (its host: the hosts' hub address)")
            self.hub_dir.mkdir(exist_ok=True)
            self.hosts.publish(self.hub_port)
        if self.secure_broker is not None:  # its authorization covers the default names
            self.federation = DEFAULT_FEDERATION
        if self.credentials and self.authority is None:
            self.authority = self.start_authority()

    def start_authority(self) -> Any:
        """A federation authority for this federation, trusted by the hub from its next
        start (its DID document and status list file, as an operator would configure)."""
        from tributary.protocol.cohorts.authority import DID_FILE, STATUS_FILE, Authority

        host = f"authority.{self.federation.lower()}.example"
        authority = Authority.init(self.root / "authority", f"did:web:{host}",
                                   self.federation, f"https://{host}/status/1")
        self.hub_env = {
            "TRIBUTARY_HUB_FEDERATION_AUTHORITIES": json.dumps([str(authority.folder / DID_FILE)]),
            "TRIBUTARY_HUB_CREDENTIAL_STATUS_LISTS": json.dumps(
                [str(authority.folder / STATUS_FILE)]),
            **self.hub_env}
        return authority

    def issue_credential(self, spoke_id: str, keyids: list[str],
                         valid_for: timedelta = timedelta(days=30),
                         valid_from: datetime | None = None) -> str:
        """The authority's membership credential for ``spoke_id``, also written beside the
        spoke's config (``membership.jwt``), where a site keeps what the authority sent."""
        token, _ = self.authority.issue(spoke_id, f"did:web:{spoke_id}.sites.example",
                                        keyids, valid_for, valid_from)
        work = self.root / "spokes" / spoke_id
        work.mkdir(parents=True, exist_ok=True)
        (work / "membership.jwt").write_text(token)
        return token

    def _hub_broker_env(self) -> dict[str, str]:
        if self.secure_broker is None:
            return {"TRIBUTARY_HUB_BROKER_HOST": self.services.host,
                    "TRIBUTARY_HUB_BROKER_PORT": str(self.services.broker_port),
                    "TRIBUTARY_HUB_BROKER_FEDERATION": self.federation}
        hub = self._handed_identity("hub", self.hub_dir / "broker")
        return {"TRIBUTARY_HUB_BROKER_FEDERATION": self.federation,
                "TRIBUTARY_HUB_BROKER_HOST": self.secure_broker.host,
                "TRIBUTARY_HUB_BROKER_PORT": str(self.secure_broker.stomp_ssl_port),
                "TRIBUTARY_HUB_BROKER_USER": "hub",
                "TRIBUTARY_HUB_BROKER_CA_FILE": str(hub.ca_file),
                "TRIBUTARY_HUB_BROKER_CERT_FILE": str(hub.cert_file),
                "TRIBUTARY_HUB_BROKER_KEY_FILE": str(hub.key_file)}

    def _handed_identity(self, name: str, folder: Path) -> Identity:
        """The broker identity ``name`` as its party holds it: with hosts, a copy in the
        party's own ``folder``; otherwise where the broker configuration wrote it."""
        identity: Identity = self.secure_broker.identity(name)
        if self.hosts is None:
            return identity
        shutil.copytree(identity.directory, folder, dirs_exist_ok=True)
        return Identity(name, folder)

    def _spoke_broker_toml(self, spoke_id: str, work: Path) -> str:
        if self.secure_broker is None:
            return (f'host = "{self.services.host}"\nport = {self.services.broker_port}\n'
                    f'federation = "{self.federation}"\n')
        ident = self._handed_identity(spoke_id, work / "broker")
        return (f'federation = "{self.federation}"\n'
                f'host = "{self.secure_broker.host}"\nport = {self.secure_broker.stomp_ssl_port}\n'
                f'user = "{spoke_id}"\n'
                f'ca_file = "{ident.ca_file}"\ncert_file = "{ident.cert_file}"\n'
                f'key_file = "{ident.key_file}"\n')

    def start_hub(self) -> Process:
        tls = []
        if self.hub_tls is not None:
            cert, key = self.hub_tls.cert_file, self.hub_tls.key_file
            if self.hosts is not None:  # the hub's own copy, on its host
                (self.hub_dir / "tls").mkdir(mode=0o700, exist_ok=True)
                cert = Path(shutil.copy2(cert, self.hub_dir / "tls" / "server.crt"))
                key = Path(shutil.copy2(key, self.hub_dir / "tls" / "server.key"))
            tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
        process = self._spawn("hub", ["hub", "serve", "--host", self.hub_address,
                                      "--port", str(self.hub_port), *tls],
                              self._hub_process_env(), party=HUB)
        deadline, last = time.monotonic() + 60, "it did not answer"
        while time.monotonic() < deadline:
            if not process.alive():
                raise RuntimeError(f"the hub exited:\n{process.log_tail()}")
            try:
                with self.client(timeout=2) as client:
                    health = client.get("/api/health").json()
                if health.get("broker_connected"):
                    self.admin_token = self.sign_in("admin", self.admin_password)
                    return process
                last = "its broker connection is not up"
            except httpx.TransportError as exc:
                last = https.explain(exc, self.hub_url, "the hub")
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise RuntimeError(f"the hub did not become ready ({last}):\n{process.log_tail()}")

    def _hub_process_env(self) -> dict[str, str]:
        """What every hub process (web, results consumer) of this federation is given."""
        return {
            **self._hub_broker_env(),
            "TRIBUTARY_HUB_DATABASE_URL": f"sqlite:///{self.hub_dir / 'hub.db'}",
            "TRIBUTARY_HUB_AUDIT_LOG": str(self.hub_audit_log),
            "TRIBUTARY_HUB_SIGNING_KEY": str(self.hub_key_path),
            "TRIBUTARY_HUB_ADMIN_PASSWORD": self.admin_password,
            "TRIBUTARY_HUB_LAUNCH_TRUST_CHECK": self.launch_trust_check,
            **self.hub_env,
        }

    def start_hub_consumer(self, index: int = 0) -> Process:
        """A results consumer of its own (``tributary hub consume``) on the hub's database
        and broker, as a hub that outgrows one process runs them; start the web app with
        ``TRIBUTARY_HUB_CONSUME_RESULTS=false`` in ``hub_env`` beside it. Returns once the
        process has started (its broker connection comes up in the background)."""
        process = self._spawn(f"hub-consumer-{index}", ["hub", "consume"],
                              self._hub_process_env(), party=HUB)
        time.sleep(0.5)
        if not process.alive():
            raise RuntimeError(f"the results consumer exited:\n{process.log_tail()}")
        return process

    def start_hub_worker(self, index: int = 0, concurrency: int = 1) -> Process:
        """A Celery worker for the hub's aggregation tasks (``tributary hub worker``) on the
        hub's database, as a deployed hub runs them; give ``hub_env`` a
        ``TRIBUTARY_HUB_CELERY_BROKER_URL`` so that the hub's debouncer sends its passes
        there instead of running them in the web process. Returns once it has started."""
        process = self._spawn(f"hub-worker-{index}",
                              ["hub", "worker", "--concurrency", str(concurrency)],
                              self._hub_process_env(), party=HUB)
        time.sleep(0.5)
        if not process.alive():
            raise RuntimeError(f"the aggregation worker exited:\n{process.log_tail()}")
        return process

    def spoke_config(self, spoke_id: str, data_dir: Path, concurrency: int = 2,
                     releasable: tuple[str, ...] = ("nodules",),
                     publisher_keys: tuple[Path, ...] = (),
                     steward: dict[str, bool] | None = None,
                     counts: dict[str, Any] | None = None,
                     cohorts: dict[str, Any] | None = None,
                     deidentification: dict[str, Any] | None = None,
                     registry: dict[str, Any] | None = None,
                     execution: str = "", sandbox: bool = False,
                     log_tails: bool = True) -> Path:
        """A spoke's config; ``execution`` is its ``[execution]`` tables as TOML text
        (:func:`execution_toml`), empty for the Docker engine."""
        work = self.root / "spokes" / spoke_id
        work.mkdir(parents=True, exist_ok=True)
        config = work / "spoke.toml"
        hub_public_key = Path(f"{self.hub_key_path}.pub")
        if self.hosts is not None:  # handed over: the spoke keeps its own copy
            hub_public_key = Path(shutil.copyfile(hub_public_key, work / "hub.pub"))
        config.write_text(
            f'spoke_id = "{spoke_id}"\ndata_dir = "{data_dir}"\nwork_dir = "{work}"\n'
            f'hub_public_key = "{hub_public_key}"\n'
            f"concurrency = {concurrency}\n\n[broker]\n{self._spoke_broker_toml(spoke_id, work)}\n"
            "[policy]\n"
            f"releasable_attributes = {json.dumps(list(releasable))}\n"
            'attributes_file = "attributes.csv"\n'
            + ("" if log_tails else "log_tails = false\n")
            + '\n[runner]\n'
            f'allowed_registries = ["{self.services.registry}"]\n'
            + ("" if self.output_quota_mb is None
               else f"output_quota_mb = {self.output_quota_mb}\n")
            + "\n[trust]\n"
            f"publisher_keys = {json.dumps([str(p) for p in publisher_keys])}\n"
            + ("sandbox = true\n" if sandbox else "")
            + _toml_table("steward", steward) + _toml_table("counts", counts)
            + _toml_table("cohorts", cohorts)
            + _toml_table("deidentification", deidentification)
            + _toml_table("registry", registry) + execution
        )
        config.chmod(0o600)  # it may hold the spoke's broker password
        return config

    def add_spoke(self, spoke_id: str, data_dir: Path, name: str = "", institution: str = "",
                  **config: Any) -> Path:
        """Register a spoke at the hub, write its config, and enrol the key it generates
        locally, as an institution's administrator would. Returns the config path."""
        from tributary.protocol.signing import SigningKey

        path = self.spoke_config(spoke_id, data_dir, **config)
        key = SigningKey.load_or_create(path.parent / "spoke.key")
        with self.api() as api:
            api.post("/api/spokes", json={"id": spoke_id, "name": name or spoke_id,
                                          "institution": institution,
                                          "sandbox": bool(config.get("sandbox"))}
                     ).raise_for_status()
            enrol: dict[str, Any] = {"public_key_pem": key.public.pem}
            if self.authority is not None:
                enrol["credential"] = self.issue_credential(spoke_id, [key.keyid])
            api.post(f"/api/spokes/{spoke_id}/keys", json=enrol).raise_for_status()
        return path

    def reviewer_tokens(self) -> list[str]:
        """Two reviewers from two organisations, created on first use."""
        if not self._reviewers:
            with self.api() as api:
                boards = (("reviewer-a", "Review Board A"), ("reviewer-b", "Review Board B"))
                for name, org in boards:
                    password = secrets.token_urlsafe(18)
                    api.post("/api/users", json={"username": name, "password": password,
                                                 "roles": ["reviewer"], "organisation": org}
                             ).raise_for_status()
                    self._reviewers.append(self.sign_in(name, password))
                    self._reviewer_accounts.append((name, password, org))
        return self._reviewers

    def reviewers(self) -> list[tuple[str, str, str]]:
        """(username, password, organisation) of the two reviewers, made on first use."""
        self.reviewer_tokens()
        return list(self._reviewer_accounts)

    def register_algorithm(self, approve: bool = True, **body: Any) -> dict[str, Any]:
        """Register an algorithm version and, unless told not to, have it approved under
        the review rule by two reviewers of two organisations."""
        with self.api() as api:
            response = api.post("/api/algorithms", json=body)
            if response.status_code != 201:
                raise RuntimeError(f"registration refused: {response.text}")
            algorithm: dict[str, Any] = response.json()
        if approve:
            for token in self.reviewer_tokens():
                with self.api(token) as api:
                    algorithm = api.post(f"/api/algorithms/{algorithm['id']}/reviews",
                                         json={"decision": "approve"}).raise_for_status().json()
        return algorithm

    def start_spoke(self, spoke_id: str, config: Path) -> Process:
        return self._spawn(f"spoke-{spoke_id}", ["spoke", "run", "--config", str(config)],
                           party=spoke_id)

    def wait_for_trust(self, spoke_ids: list[str], timeout: float = 60,
                       keyid: str | None = None) -> None:
        """Until each spoke has reported its publisher trust in a heartbeat (and, with
        ``keyid``, trusts that key): what the hub's launch check reads."""
        with self.api() as api:
            wait_for_trust(api, spoke_ids, timeout, keyid)

    def wait_for_experiment(self, experiment_id: str, timeout: float,
                            on_progress: Any = None) -> dict[str, Any]:
        """Poll until the experiment completes; fail early if a process died."""
        deadline = time.monotonic() + timeout
        with self.api() as api:
            while True:
                experiment = poll(api, f"/api/experiments/{experiment_id}")
                if on_progress:
                    on_progress(experiment)
                if experiment["state"] == "completed":
                    return experiment
                dead = [p for p in self.processes.values() if not p.alive()]
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"experiment {experiment_id} not complete after "
                                       f"{timeout:.0f} s: {experiment['targets']}")
                time.sleep(0.5)

    @staticmethod
    def watch_containers(label: str) -> ContainerWatch:
        """Start watching for containers the engine creates with ``label`` (``key=value``):
        the evidence that something did, or did not, run is ``watch.stop()``."""
        return ContainerWatch(label).start()

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
