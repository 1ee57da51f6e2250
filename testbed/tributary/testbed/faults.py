"""Fault injection for real: a whole federation (hub, spokes, a broker of its own) whose
components can be stopped or killed at any moment and started again, with the checks that
prove nothing was lost or doubled. The fault tests, the chaos test and the recovery
benchmark all drive it, so what they measure is the same thing.

The broker is a *private* ActiveMQ instance on free ports, never the shared one: killing
it must not disturb anybody else using the machine.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import docker
import httpx
import requests

from tributary.services import broker as broker_service
from tributary.services.settings import ServiceSettings
from tributary.spoke.journal import Journal
from tributary.testbed.federation import LocalFederation, generate_cohort

COMPONENTS = ("hub", "spoke", "broker", "container")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class FaultRig:
    """A federation of ``spokes`` spokes sharing one synthetic cohort, on a private broker."""

    root: Path
    services: ServiceSettings
    image: tuple[str, str]
    spokes: int = 3
    cases_per_spoke: int = 17
    concurrency: int = 2
    heartbeat_seconds: float = 1.0
    online_seconds: float = 4.0
    #: (seconds since the rig started, what happened), for the log of a chaos run.
    events: list[tuple[float, str]] = field(default_factory=list)
    federation: LocalFederation = field(init=False)
    configs: dict[str, Path] = field(init=False, default_factory=dict)
    algorithm_id: int = field(init=False, default=0)
    broker_base: Path = field(init=False)
    broker_port: int = field(init=False, default=0)
    _t0: float = field(init=False, default_factory=time.monotonic)

    # -- set-up -----------------------------------------------------------------------------
    def start(self) -> FaultRig:
        self.root.mkdir(parents=True, exist_ok=True)
        self.broker_port = free_port()
        self.broker_base = self.root / "activemq"
        (self.broker_base / "conf").mkdir(parents=True, exist_ok=True)
        template = resources.files("tributary.services").joinpath("activemq.xml").read_text()
        self._broker_config.write_text(template.replace("@HOST@", self.services.host)
                                       .replace("@PORT@", str(self.broker_port)))
        self.start_broker()
        self.federation = LocalFederation(
            self.root / "federation",
            services=self.services.model_copy(update={"broker_port": self.broker_port}),
            hub_env={"TRIBUTARY_HUB_SPOKE_ONLINE_SECONDS": str(self.online_seconds)})
        self.federation.start_hub()
        data = self.root / "cohort"
        generate_cohort(data, self.cases_per_spoke, seed=11, site="Fault Hospital")
        for index in range(self.spokes):
            spoke_id = f"site-{index + 1}-{uuid.uuid4().hex[:4]}"
            config = self.federation.add_spoke(spoke_id, data, concurrency=self.concurrency)
            config.write_text(config.read_text()
                              + f"\n[liveness]\nheartbeat_seconds = {self.heartbeat_seconds}\n")
            self.configs[spoke_id] = config
            self.federation.start_spoke(spoke_id, config)
        algorithm = self.federation.register_algorithm(
            name=f"fault-{uuid.uuid4().hex[:6]}", version="1", repository=self.image[0],
            digest=self.image[1], argument_schema={"type": "object"})
        self.algorithm_id = int(algorithm["id"])
        return self

    def close(self) -> None:
        self.federation.stop()
        broker_service.stop_instance(self.broker_base)

    @property
    def _broker_config(self) -> Path:
        return self.broker_base / "conf" / "activemq.xml"

    def note(self, what: str) -> None:
        self.events.append((time.monotonic() - self._t0, what))

    # -- components -------------------------------------------------------------------------
    def stop_hub(self, kill: bool = False) -> None:
        self._stop(self.federation.processes["hub"].popen, kill)
        self.note(f"{'killed' if kill else 'stopped'} the hub")

    def start_hub(self) -> None:
        self.federation.start_hub()
        self.note("started the hub")

    def stop_spoke(self, spoke_id: str, kill: bool = False) -> None:
        self._stop(self.federation.processes[f"spoke-{spoke_id}"].popen, kill)
        self.note(f"{'killed' if kill else 'stopped'} spoke {spoke_id}")

    def start_spoke(self, spoke_id: str) -> None:
        self.federation.start_spoke(spoke_id, self.configs[spoke_id])
        self.note(f"started spoke {spoke_id}")

    def stop_broker(self, kill: bool = False) -> None:
        if kill:
            os.kill(int((self.broker_base / "broker.pid").read_text()), signal.SIGKILL)
            _wait(lambda: not _port_open(self.services.host, self.broker_port), 30,
                  "broker gone")
        else:
            broker_service.stop_instance(self.broker_base)
        self.note(f"{'killed' if kill else 'stopped'} the broker")

    def start_broker(self) -> None:
        broker_service.start_instance(self.broker_base, self._broker_config,
                                      self.services.host, self.broker_port)
        self.note("started the broker")

    def kill_container(self, spoke_id: str | None = None,
                       rng: random.Random | None = None) -> str | None:
        """``docker kill`` one running algorithm container; returns its case id (None if
        nothing was running)."""
        client = docker.from_env()
        try:
            running = [c for c in client.containers.list(
                filters={"label": "org.tributary.spoke"}, ignore_removed=True)
                if c.labels.get("org.tributary.spoke") in self.configs
                and (spoke_id is None or c.labels["org.tributary.spoke"] == spoke_id)]
            if not running:
                return None
            victim = (rng or random).choice(running)
            try:
                victim.kill()
                # A container in its last instant may still take the kill after its process
                # exited by itself: only an exit by SIGKILL (137) counts as killed.
                status = victim.wait(timeout=10).get("StatusCode")
            except (docker.errors.APIError, requests.exceptions.RequestException):
                return None  # it finished (or was removed) first
            if status != 137:
                return None
            case = victim.labels.get("org.tributary.case-id", "?")
            self.note(f"killed the container of case {case} at "
                      f"{victim.labels['org.tributary.spoke']}")
            return case
        finally:
            client.close()

    @staticmethod
    def _stop(popen: Any, kill: bool) -> None:
        popen.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            popen.wait(30)
        except Exception:
            popen.kill()
            popen.wait()

    def alive(self, name: str) -> bool:
        process = self.federation.processes.get(name)
        return process is not None and process.alive()

    # -- studies ----------------------------------------------------------------------------
    def launch(self, arguments: dict[str, Any], max_cases: int | None = None) -> str:
        cohort: dict[str, Any] = {"max_cases": max_cases} if max_cases else {}
        with self.federation.api() as api:
            created = api.post("/api/experiments", json={
                "name": f"faults {arguments}", "algorithm_id": self.algorithm_id,
                "arguments": arguments, "spoke_ids": list(self.configs), "cohort": cohort,
                "limits": {"timeout_seconds": 300, "memory_mb": 256}})
            created.raise_for_status()
            experiment_id = str(created.json()["id"])
            api.post(f"/api/experiments/{experiment_id}/launch").raise_for_status()
        self.note(f"launched {experiment_id}")
        return experiment_id

    def experiment(self, experiment_id: str) -> dict[str, Any] | None:
        """The experiment as the API shows it; None while the hub is away."""
        try:
            with self.federation.api() as api:
                return api.get(f"/api/experiments/{experiment_id}").raise_for_status().json()
        except httpx.HTTPError:
            return None

    def succeeded(self, experiment_id: str) -> int:
        experiment = self.experiment(experiment_id)
        return sum(t["succeeded"] for t in experiment["targets"]) if experiment else 0

    def wait_succeeded(self, experiment_id: str, count: int, timeout: float = 300) -> None:
        _wait(lambda: self.succeeded(experiment_id) >= count, timeout,
              f"{count} succeeded cases")

    def wait_completed(self, experiment_id: str, timeout: float = 300) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            experiment = self.experiment(experiment_id)
            return experiment if experiment and experiment["state"] == "completed" else None

        return _wait(done, timeout, f"completion of {experiment_id}")

    def cases(self, experiment_id: str) -> list[dict[str, Any]]:
        """Every case: the list is paginated, so each page's ``Link: rel=next`` is followed."""
        found: list[dict[str, Any]] = []
        with self.federation.api() as api:
            response = api.get(f"/api/experiments/{experiment_id}/cases",
                               params={"limit": 1000})
            while True:
                found += response.raise_for_status().json()
                if "next" not in response.links:
                    return found
                response = api.get(response.links["next"]["url"])

    def retry_failed(self, experiment_id: str, timeout: float = 300) -> list[str]:
        """Run the failed cases again (new attempts) and wait for the experiment."""
        failed = [c["case_id"] for c in self.cases(experiment_id) if c["state"] == "failed"]
        if failed:
            with self.federation.api() as api:
                api.post(f"/api/experiments/{experiment_id}/retry",
                         json={"reason": "container killed by fault injection"}
                         ).raise_for_status()
            self.note(f"retried {len(failed)} failed case(s)")
            self.wait_completed(experiment_id, timeout)
        return failed

    def figures(self, experiment_id: str) -> dict[str, Any]:
        """The hub's aggregate and every case's output: what a coordinator reads. Case ids
        released to the hub differ from study to study, so outputs are keyed here by the
        catalog case each spoke's journal maps them to (and the echoed id is left out), to
        compare one study with another."""
        with self.federation.api() as api:
            report = api.get(f"/api/experiments/{experiment_id}/aggregate").raise_for_status()
        catalog: dict[str, dict[str, str]] = {}
        for spoke_id, config in self.configs.items():
            journal = Journal(config.parent / "journal.db")
            try:
                catalog[spoke_id] = journal.released_cases(experiment_id)
            finally:
                journal.close()
        outputs = {(c["spoke_id"], catalog[c["spoke_id"]].get(c["case_id"], c["case_id"])):
                   {k: v for k, v in (c["output"] or {}).items() if k != "case_id"}
                   for c in self.cases(experiment_id)}
        return {"groups": report.json()["groups"], "outputs": outputs}

    def check_exactly_once(self, experiment_id: str, expected_cases: int) -> list[str]:
        """Every case the spokes selected has exactly one accepted result per attempt, none
        is missing, and its latest attempt succeeded. Returns problems (empty: all well)."""
        problems: list[str] = []
        with sqlite3.connect(self.federation.root / "hub.db") as db:
            targets = dict(db.execute("SELECT spoke_id, case_count FROM experimenttarget "
                                      "WHERE experiment_id=?", (experiment_id,)).fetchall())
            cases = db.execute("SELECT spoke_id, case_id, state, attempt, result_message_id "
                               "FROM caseresult WHERE experiment_id=?",
                               (experiment_id,)).fetchall()
            attempts = Counter(db.execute(
                "SELECT spoke_id, case_id FROM caseattempt WHERE experiment_id=?",
                (experiment_id,)).fetchall())
            latest = Counter(db.execute(
                "SELECT spoke_id, case_id, attempt FROM caseattempt WHERE experiment_id=?",
                (experiment_id,)).fetchall())
            applied = {row[0] for row in db.execute(
                "SELECT message_id FROM inboundmessage WHERE kind='result'")}
        if sum(v or 0 for v in targets.values()) != expected_cases:
            problems.append(f"spokes selected {targets}, expected {expected_cases} cases")
        if len(cases) != expected_cases:
            problems.append(f"{len(cases)} cases at the hub, expected {expected_cases}")
        for spoke_id, case_id, state, attempt, message_id in cases:
            if state.lower() != "succeeded":
                problems.append(f"{spoke_id}/{case_id} is {state}")
            if attempts[(spoke_id, case_id)] != attempt:
                problems.append(f"{spoke_id}/{case_id}: {attempts[(spoke_id, case_id)]} "
                                f"accepted results for {attempt} attempt(s)")
            if latest[(spoke_id, case_id, attempt)] != 1:
                problems.append(f"{spoke_id}/{case_id}: attempt {attempt} has "
                                f"{latest[(spoke_id, case_id, attempt)]} accepted results")
            if message_id not in applied:
                problems.append(f"{spoke_id}/{case_id}: result {message_id} not recorded")
        return problems

    def duplicates_ignored(self, experiment_id: str) -> int:
        """How many result deliveries the hub recognised as duplicates (its audit trail)."""
        with self.federation.api() as api:
            events = api.get("/api/audit", params={"target": experiment_id,
                                                   "limit": 5000}).json()
        return sum(1 for e in events if e["action"] == "message.duplicate"
                   or (e["action"] == "message.received" and e["detail"].get("duplicate")))


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _wait(probe: Callable[[], Any], timeout: float, what: str, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(every)
    return value


def chaos(rig: FaultRig, experiment_id: str, duration: float, rng: random.Random,
          report: Callable[[str], None] = print) -> list[tuple[float, str]]:
    """For ``duration`` seconds (or until the study completes), kill a random component
    (``kill -9``; ``docker kill`` for a container) at a random moment, bring it back after
    a random pause, and report each step. Returns the steps taken."""
    began = time.monotonic()
    steps: list[tuple[float, str]] = []

    def log(what: str) -> None:
        steps.append((time.monotonic() - began, what))
        report(f"chaos +{steps[-1][0]:6.1f}s  {what}")

    while time.monotonic() - began < duration:
        time.sleep(rng.uniform(2.0, 6.0))
        experiment = rig.experiment(experiment_id)
        if experiment and experiment["state"] == "completed":
            log("study completed; chaos ends")
            break
        victim = rng.choice(COMPONENTS)
        if victim == "hub":
            rig.stop_hub(kill=True)
            log("kill -9 hub")
        elif victim == "spoke":
            spoke_id = rng.choice(sorted(rig.configs))
            rig.stop_spoke(spoke_id, kill=True)
            log(f"kill -9 spoke {spoke_id}")
        elif victim == "broker":
            rig.stop_broker(kill=True)
            log("kill -9 broker")
        else:
            case = rig.kill_container(rng=rng)
            log(f"docker kill container of case {case}" if case else
                "docker kill: no container running, nothing killed")
            continue
        time.sleep(rng.uniform(0.5, 4.0))
        if victim == "hub":
            rig.start_hub()
        elif victim == "spoke":
            rig.start_spoke(spoke_id)
        else:
            rig.start_broker()
        log(f"restarted {victim}")
    return steps
