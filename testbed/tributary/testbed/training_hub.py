"""A hub process for federated training on this machine: `tributary hub serve` with its own
database, signing key and audit log in a folder, the machine's broker under a federation
name of its own, and the hub's credentials for an object store. Used by `tributary demo
training` and by the tests that kill and restart the hub mid-round."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tributary.protocol.signing import SigningKey
from tributary.services.system import free_port

TRIBUTARY = str(Path(sys.executable).with_name("tributary"))


@dataclass
class TrainingHub:
    """``folder`` holds ``hub.db``, ``hub.key``, ``audit.jsonl`` and one log per start.
    ``apart``: the round loop runs as `tributary hub train` beside the web app (started,
    killed and stopped with it) instead of in it."""

    folder: Path
    broker_host: str
    broker_port: int
    federation: str
    #: The hub's object-store credentials (None: a hub without training service).
    store_credentials: Path | None
    poll_seconds: float = 0.2
    apart: bool = False
    #: Whether the web app runs the round loop too (default: when not ``apart``). With
    #: ``apart`` and this, two processes compete for the training lease and one leads.
    web_app_training: bool | None = None
    #: Further TRIBUTARY_HUB_* settings for the hub's processes.
    settings: dict[str, str] = field(default_factory=dict)
    #: A Celery broker: the rounds are closed by a `tributary hub worker` started, killed
    #: and stopped with the hub (None: by the round loop itself).
    celery_broker_url: str | None = None
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    port: int = field(default_factory=lambda: free_port("127.0.0.1"))
    starts: int = 0
    process: subprocess.Popen | None = None  # type: ignore[type-arg]
    trainer: subprocess.Popen | None = None  # type: ignore[type-arg]
    worker: subprocess.Popen | None = None  # type: ignore[type-arg]
    #: The administrator's bearer token, from the latest start.
    admin_token: str = ""

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        #: The hub's signing key, made before the first start so spokes can pin it.
        self.key = SigningKey.load_or_create(self.folder / "hub.key")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.folder / 'hub.db'}"

    def env(self) -> dict[str, str]:
        store = ({"TRIBUTARY_HUB_OBJECTSTORE_CREDENTIALS": str(self.store_credentials)}
                 if self.store_credentials is not None else {})
        return {**os.environ, **store,
                "TRIBUTARY_HUB_DATABASE_URL": self.database_url,
                "TRIBUTARY_HUB_SIGNING_KEY": str(self.folder / "hub.key"),
                "TRIBUTARY_HUB_AUDIT_LOG": str(self.folder / "audit.jsonl"),
                "TRIBUTARY_HUB_ADMIN_PASSWORD": self.password,
                "TRIBUTARY_HUB_BROKER_HOST": self.broker_host,
                "TRIBUTARY_HUB_BROKER_PORT": str(self.broker_port),
                "TRIBUTARY_HUB_BROKER_FEDERATION": self.federation,
                "TRIBUTARY_HUB_TRAINING_POLL_SECONDS": str(self.poll_seconds),
                "TRIBUTARY_HUB_RUN_TRAINING": "true" if self.web_app_training or (
                    self.web_app_training is None and not self.apart) else "false",
                **({"TRIBUTARY_HUB_CELERY_BROKER_URL": self.celery_broker_url}
                   if self.celery_broker_url else {}),
                **self.settings}

    def log_path(self) -> Path:
        return self.folder / f"hub-{self.starts}.log"

    def log(self, chars: int = 4000) -> str:
        """The end of the current start's log."""
        path = self.log_path()
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def logs(self) -> str:
        """Every start's logs (web app, then the training process if apart), in order."""
        paths = [self.folder / f"{name}-{n}.log" for n in range(1, self.starts + 1)
                 for name in ("hub", "train", "worker")]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def start(self, timeout: float = 60) -> None:
        self.starts += 1
        with open(self.log_path(), "wb") as log:
            self.process = subprocess.Popen(
                [TRIBUTARY, "hub", "serve", "--port", str(self.port)], env=self.env(),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the hub stopped while starting:\n" + self.log())
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            raise RuntimeError("the hub did not start:\n" + self.log())
        self.admin_token = self.sign_in()
        if self.apart:  # after the web app: it has brought the schema up to date
            with open(self.folder / f"train-{self.starts}.log", "wb") as log:
                self.trainer = subprocess.Popen(
                    [TRIBUTARY, "hub", "train"], env=self.env(), stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        if self.celery_broker_url:
            with open(self.folder / f"worker-{self.starts}.log", "wb") as log:
                self.worker = subprocess.Popen(
                    [TRIBUTARY, "hub", "worker"], env=self.env(), stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _processes(self) -> list[subprocess.Popen]:  # type: ignore[type-arg]
        return [p for p in (self.worker, self.trainer, self.process)
                if p is not None and p.poll() is None]

    def kill(self) -> None:
        """SIGKILL to each of the hub's process groups: nothing of them is kept."""
        for process in self._processes():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)

    def stop(self) -> None:
        for process in self._processes():
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)

    # --- through the hub's API ---------------------------------------------------------

    def sign_in(self, username: str = "admin", password: str | None = None) -> str:
        response = httpx.post(f"{self.url}/api/auth/token", json={
            "username": username, "password": self.password if password is None else password})
        response.raise_for_status()
        return str(response.json()["access_token"])

    def api(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120,
                            headers={"Authorization": f"Bearer {token}"})

    @staticmethod
    def enrol(api: httpx.Client, spoke_id: str, key: SigningKey) -> None:
        """Register ``spoke_id`` and enrol its key, as an administrator does."""
        api.post("/api/spokes", json={"id": spoke_id, "name": spoke_id}).raise_for_status()
        api.post(f"/api/spokes/{spoke_id}/keys",
                 json={"public_key_pem": key.public.pem}).raise_for_status()

    def register_approved(self, api: httpx.Client, name: str, repository: str, digest: str,
                          publisher: SigningKey) -> int:
        """Register ``publisher``, the version it released and have two reviewers of two
        organisations approve it, as a federation's people do; returns the version's id
        (what a training study names)."""
        from tributary.protocol.release import sign_release

        api.post("/api/publishers", json={"name": "Demo publisher",
                                          "public_key_pem": publisher.public.pem}
                 ).raise_for_status()
        algorithm = api.post("/api/algorithms", json={
            "name": name, "version": "1", "repository": repository, "digest": digest,
            "release_signature": sign_release(publisher, repository, digest, name, "1",
                                              "Demo publisher")}).raise_for_status().json()
        for reviewer, organisation in (("reviewer-a", "Board A"), ("reviewer-b", "Board B")):
            password = secrets.token_urlsafe(18)
            api.post("/api/users", json={"username": reviewer, "password": password,
                                         "roles": ["reviewer"], "organisation": organisation}
                     ).raise_for_status()
            with self.api(self.sign_in(reviewer, password)) as review:
                algorithm = review.post(f"/api/algorithms/{algorithm['id']}/reviews",
                                        json={"decision": "approve"}).raise_for_status().json()
        if algorithm.get("approval") is None:
            raise RuntimeError(f"{name} 1 was not approved: {algorithm}")
        return int(algorithm["id"])

    @staticmethod
    def wait_for_end(api: httpx.Client, study_id: str, timeout: float,
                     poll: float = 1.0) -> dict[str, Any]:
        """The study's JSON once it has ended (finished, stopped, failed)."""
        deadline = time.monotonic() + timeout
        while True:
            response = api.get(f"/api/training-studies/{study_id}")
            response.raise_for_status()
            study: dict[str, Any] = response.json()
            if study["state"] != "running":
                return study
            if time.monotonic() > deadline:
                raise TimeoutError(f"study {study_id} did not end within {timeout} s")
            time.sleep(poll)
