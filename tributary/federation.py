"""A whole federation on one machine, as real processes: one hub and several spokes,
talking through the real broker, pulling from the real registry and running real
containers. The demo and the end-to-end tests both drive it, so what the tests prove is
what a person sees."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tributary.services.settings import ServiceSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"


def examples_dir() -> Path:
    if not (EXAMPLES / "lung_nodule").is_dir():
        raise FileNotFoundError("the examples/ folder of a Tributary checkout is needed here")
    return EXAMPLES


def build_and_push(algorithm_dir: Path, name: str, version: str,
                   services: ServiceSettings) -> tuple[str, str]:
    """Build an algorithm image FROM the local base image and push it to the local
    registry; returns (repository, manifest digest)."""
    from tributary_algorithm.tools.build import build_image
    from tributary_algorithm.tools.push import push_image

    tag = f"tributary/{name}:{version}"
    build_image(algorithm_dir, tag, base_image=services.base_image,
                wheel_cache=services.state_dir / "wheels")
    return push_image(tag, f"{services.registry}/tributary/{name}:{version}")


def generate_cohort(out: Path, cases: int, seed: int, site: str) -> dict[str, Any]:
    """Synthetic CT cohort with ground truth, written by the example generator."""
    if out.exists():
        shutil.rmtree(out)
    subprocess.run(
        [sys.executable, str(examples_dir() / "synthetic_ct" / "generate.py"), "--out", str(out),
         "--cases", str(cases), "--seed", str(seed), "--site", site],
        check=True, capture_output=True,
    )
    return json.loads((out / "ground_truth.json").read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@dataclass
class LocalFederation:
    root: Path
    services: ServiceSettings = field(default_factory=ServiceSettings)
    hub_port: int = 0
    processes: dict[str, Process] = field(default_factory=dict)
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    admin_token: str = ""
    _reviewers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.hub_port = self.hub_port or _free_port()

    @property
    def hub_key_path(self) -> Path:
        return self.root / "hub.key"

    @property
    def hub_audit_log(self) -> Path:
        return self.root / "hub-audit.jsonl"

    @property
    def hub_url(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    def api(self, token: str | None = None) -> httpx.Client:
        """An API client signed in as the federation's administrator (or with ``token``)."""
        return httpx.Client(base_url=self.hub_url, timeout=30,
                            headers={"Authorization": f"Bearer {token or self.admin_token}"})

    def sign_in(self, username: str, password: str) -> str:
        response = httpx.post(f"{self.hub_url}/api/auth/token", timeout=30,
                              json={"username": username, "password": password})
        response.raise_for_status()
        return str(response.json()["access_token"])

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        log = self.root / "logs" / f"{name}.log"
        handle = open(log, "ab")  # noqa: SIM115 - owned by the child process
        popen = subprocess.Popen(
            [sys.executable, "-m", "tributary.cli", *args], stdout=handle,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )
        handle.close()
        process = self.processes[name] = Process(name, popen, log)
        return process

    def start_hub(self) -> Process:
        process = self._spawn("hub", ["hub", "serve", "--port", str(self.hub_port)], {
            "TRIBUTARY_HUB_DATABASE_URL": f"sqlite:///{self.root / 'hub.db'}",
            "TRIBUTARY_HUB_AUDIT_LOG": str(self.hub_audit_log),
            "TRIBUTARY_HUB_SIGNING_KEY": str(self.hub_key_path),
            "TRIBUTARY_HUB_ADMIN_PASSWORD": self.admin_password,
            "TRIBUTARY_HUB_BROKER_HOST": self.services.host,
            "TRIBUTARY_HUB_BROKER_PORT": str(self.services.broker_port),
        })
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not process.alive():
                raise RuntimeError(f"the hub exited:\n{process.log_tail()}")
            try:
                health = httpx.get(f"{self.hub_url}/api/health", timeout=2).json()
                if health.get("broker_connected"):
                    self.admin_token = self.sign_in("admin", self.admin_password)
                    return process
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the hub did not become ready:\n{process.log_tail()}")

    def spoke_config(self, spoke_id: str, data_dir: Path, concurrency: int = 2,
                     releasable: tuple[str, ...] = ("nodules",),
                     publisher_keys: tuple[Path, ...] = ()) -> Path:
        work = self.root / "spokes" / spoke_id
        work.mkdir(parents=True, exist_ok=True)
        config = work / "spoke.toml"
        config.write_text(
            f'spoke_id = "{spoke_id}"\ndata_dir = "{data_dir}"\nwork_dir = "{work}"\n'
            f'hub_public_key = "{self.hub_key_path}.pub"\n'
            f"concurrency = {concurrency}\n\n[broker]\nhost = \"{self.services.host}\"\n"
            f"port = {self.services.broker_port}\n\n[policy]\n"
            f"releasable_attributes = {json.dumps(list(releasable))}\n"
            'attributes_file = "ground_truth.json"\n\n[runner]\n'
            f'allowed_registries = ["{self.services.registry}"]\n\n[trust]\n'
            f"publisher_keys = {json.dumps([str(p) for p in publisher_keys])}\n"
        )
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
                                          "institution": institution}).raise_for_status()
            api.post(f"/api/spokes/{spoke_id}/keys",
                     json={"public_key_pem": key.public.pem}).raise_for_status()
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
        return self._reviewers

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
        return self._spawn(f"spoke-{spoke_id}", ["spoke", "run", "--config", str(config)])

    def wait_for_experiment(self, experiment_id: str, timeout: float,
                            on_progress: Any = None) -> dict[str, Any]:
        """Poll until the experiment completes; fail early if a process died."""
        deadline = time.monotonic() + timeout
        with self.api() as api:
            while True:
                experiment = api.get(f"/api/experiments/{experiment_id}").raise_for_status().json()
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

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
