"""The demo study behind ``tributary demo``: a local federation from nothing to aggregated
results. It lives in the testbed because it drives the testbed's federation; the command in
``tributary.cli.demo`` only parses options and calls ``run_demo``.

With ``hosts``, the parties are on separate simulated hosts (network namespaces,
:mod:`tributary.testbed.hosts`): broker, registry and hub on the hub side, each spoke on its
own host that may only open connections to the hub side's published ports."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tributary import services
from tributary.cli.results_table import aggregate_table
from tributary.protocol.registry import RegistryClient, split_repository
from tributary.protocol.release import PREDICATE_TYPE, sign_release
from tributary.protocol.signing import SigningKey
from tributary.services.broker_security import (
    generate_broker_config,
    start_broker,
    stop_broker,
)
from tributary.services.settings import ServiceSettings
from tributary.testbed import access_demo
from tributary.testbed.compose import ComposeFederation, state_folder
from tributary.testbed.federation import (
    LocalFederation,
    build_and_push,
    examples_dir,
    execution_toml,
    free_port,
    generate_cohort,
    wait_for_trust,
)
from tributary.testbed.hosts import HUB, Hosts
from tributary.testbed.hub_side import HubSide

#: The hub-side sandbox spoke (synthetic data only) of the demo run as processes here.
SANDBOX = ("sandbox", "Sandbox (synthetic data only)")

SITES = [("northfield", "Northfield General Hospital"), ("riverside", "Riverside Medical Centre"),
         ("stclare", "St Clare University Hospital"), ("lakeside", "Lakeside Clinic")]


def run_demo(case_counts: list[int], hub_port: int = 8000, wait: bool = True,
             workdir: Path | None = None, console: Console | None = None,
             containers: ServiceSettings | None = None, hosts: bool | Hosts = False,
             after_study: Callable[[LocalFederation, HubSide | None], None] | None = None,
             podman: bool = False) -> dict[str, Any]:
    """The demo study. With ``containers`` (the ports for the compose broker and
    registry), the hub, spokes, broker and registry run as the containers of
    docker-compose.yml; otherwise as processes on this machine, each party on a host of
    its own with ``hosts`` (True: hosts made and removed here; a :class:`Hosts`: the
    caller's, set up, for the spokes of the demo's sites). ``after_study`` is called with
    the running federation (and the hub side's services, with ``hosts``) once the study is
    complete, before anything stops. With ``podman``, the last spoke runs its cases on
    Podman (its Docker-compatible socket) instead of the Docker engine."""
    console = console or Console()
    if hosts and containers:
        raise ValueError("the containers of docker-compose.yml are not placed on hosts")
    with contextlib.ExitStack() as cleanup:
        return _run_demo(case_counts, hub_port, wait, workdir, console, containers, hosts,
                         after_study, cleanup, podman)


def _run_demo(case_counts: list[int], hub_port: int, wait: bool, workdir: Path | None,
              console: Console, containers: ServiceSettings | None, hosts: bool | Hosts,
              after_study: Callable[[LocalFederation, HubSide | None], None] | None,
              cleanup: contextlib.ExitStack, podman: bool = False) -> dict[str, Any]:
    settings = containers or ServiceSettings()
    root = (workdir or (state_folder(settings) if containers
                        else settings.state_dir / "demo")).resolve()
    if root.exists():
        shutil.rmtree(root)
    if len(case_counts) > len(SITES) or (containers and len(case_counts) > 3):
        raise ValueError("too many spokes for the demo")
    spoke_ids = [spoke_id for (spoke_id, _), _ in zip(SITES, case_counts, strict=False)]

    compose: ComposeFederation | None = None
    if containers:
        console.rule("1. Images and services (docker-compose)")
        compose = ComposeFederation(root, settings, hub_port)
        cleanup.callback(compose.stop)
        with console.status("building the broker, registry, hub and spoke images…"):
            compose.build()
        compose.start_services()
        console.print(f"  broker     stomp://{settings.host}:{settings.broker_port}")
        console.print(f"  registry   {settings.registry}")
    else:
        console.rule("1. Services")
        services.up(settings, report=lambda n, s: console.print(f"  {n:<11} {s}"))
    hub_side: HubSide | None = None
    federation: LocalFederation | None = None
    #: Who pushes the image: nobody to an open loopback registry, else a developer account.
    developer: dict[str, Any] = {}
    if hosts:
        console.rule("1b. Separate hosts (network namespaces)")
        placed = hosts if isinstance(hosts, Hosts) else cleanup.enter_context(Hosts(spoke_ids))
        for party, netns, address in placed.describe():
            role = "engine" if netns.startswith("(") else party
            console.print(f"  {role:<11} host {netns}, address {address}")
        console.print("  spokes may only open connections to the hub side's published ports")
        with console.status("issuing the federation's certificates, starting the broker "
                            "(mutual TLS), the registry and the object store on the hub "
                            "side…"):
            hub_side = cleanup.enter_context(HubSide(placed, root / "hub-side", spoke_ids,
                                                     settings, hub_port=hub_port))
        assert hub_side.broker is not None
        console.print(f"  broker     {hub_side.broker.url} (host {placed.netns(HUB)})")
        console.print(f"  registry   https://{hub_side.registry} (host {placed.netns(HUB)}), "
                      "tokens from the hub; this machine's engine trusts the federation CA")
        console.print(f"  objects    https://{placed.hub_address}:{hub_side.objectstore_port} "
                      f"(host {placed.netns(HUB)}), one S3 identity per party")
        settings = hub_side.settings
        # The registry takes tokens from the hub: the hub first, then a developer account
        # (``tributary/...`` is its own namespace) to push the image with.
        federation = LocalFederation(root, settings, hub_port, secure_broker=hub_side.broker,
                                     hub_tls=hub_side.hub_tls, hosts=placed,
                                     hub_env={**hub_side.hub_env, **access_demo.HUB_ENV},
                                     credentials=True)
        cleanup.callback(federation.stop)
        federation.start_hub()
        console.print(f"  hub        {federation.hub_url} (host {placed.netns(HUB)})")
        developer = {"username": "tributary", "password": secrets.token_urlsafe(18)}
        with federation.api() as api:
            api.post("/api/users", json={**developer, "roles": ["developer"]}
                     ).raise_for_status()

    console.rule("2. Algorithm image, pinned by digest and signed by its publisher")
    with console.status("building and pushing the lung-nodule detector…"):
        repository, digest = build_and_push(examples_dir() / "lung_nodule", "lung-nodule",
                                            "1.0.0", settings, **developer)
    console.print(f"  {repository}@{digest}")
    publisher = SigningKey.generate()
    publisher.save(root / "publisher.key")
    release = sign_release(publisher, repository, digest, "lung-nodule", "1.0.0",
                           "Tributary examples")
    registry, name = split_repository(repository)
    with RegistryClient(registry, **developer,
                        ca_file=hub_side.ca_file if hub_side else None) as client:
        client.attach(name, digest, release, PREDICATE_TYPE)
    console.print(f"  release signed by publisher key {publisher.keyid[:16]}…, stored beside "
                  "the image (cosign attestation layout)")

    console.rule("3. Synthetic CT cohorts, one per spoke")
    broker = None
    if compose is not None:
        federation = compose
    elif federation is not None:
        pass  # on separate hosts: made, with its hub, in step 1b
    else:
        with console.status("generating a private CA and the broker's mutual-TLS "
                            "configuration…"):
            broker = generate_broker_config(root / "broker", spoke_ids=[*spoke_ids, SANDBOX[0]],
                                            host=settings.host, stomp_ssl_port=free_port())
            start_broker(broker)
            cleanup.callback(stop_broker, broker)
        federation = LocalFederation(root, settings, hub_port, secure_broker=broker,
                                     launch_trust_check="strict", credentials=True,
                                     hub_env=access_demo.HUB_ENV)
        cleanup.callback(federation.stop)
    # On separate hosts, a site's data is on its own host (under its own folder).
    data = {spoke_id: root / "spokes" / spoke_id / "data" if hosts else root / "data" / spoke_id
            for spoke_id in spoke_ids}
    cohorts = {}
    for (spoke_id, site), count in zip(SITES, case_counts, strict=False):
        seed = zlib.crc32(spoke_id.encode()) % 1000
        truth = generate_cohort(data[spoke_id], count, seed=seed, site=site)
        cohorts[spoke_id] = site
        nodules = sum(len(v["nodules"]) for v in truth.values())
        console.print(f"  {spoke_id:<11} {count} cases, {nodules} nodules ({site})")

    try:
        console.rule("4. Hub and spokes")
        if "hub" not in federation.processes:  # on separate hosts it runs since step 1b
            federation.start_hub()
            console.print(f"  hub        {federation.hub_url}")
        if broker is not None:
            console.print(f"  broker     stomp+ssl://{broker.host}:{broker.stomp_ssl_port}, "
                          "one client certificate per party, each confined to its own queues")
        if getattr(federation, "authority", None) is not None:
            console.print(f"  authority  {federation.authority.state.did}: each spoke's "
                          "membership credential (a W3C verifiable credential bound to its "
                          "keys) is presented at enrolment and checked at every launch")
        schema_file = examples_dir() / "lung_nodule" / "arguments.schema.json"
        schema = json.loads(schema_file.read_text())
        with federation.api() as api:
            api.post("/api/publishers", json={"name": "Tributary examples",
                                              "public_key_pem": publisher.public.pem}
                     ).raise_for_status()
            for spoke_id, site in cohorts.items():
                trusted = root / "spokes" / spoke_id / "publisher.pub"  # the spoke's own copy
                trusted.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / "publisher.key.pub", trusted)
                registry_access = ({} if hub_side is None else {"registry": hub_side.spoke_registry(
                    root / "spokes" / spoke_id)})
                engine = "podman" if podman and spoke_id == spoke_ids[-1] else "docker"
                config = federation.add_spoke(spoke_id, data[spoke_id], institution=site,
                                              publisher_keys=(trusted,), **registry_access,
                                              execution=execution_toml(engine, settings))
                federation.start_spoke(spoke_id, config)
                where = (f" (host {federation.hosts.netns(spoke_id)}, files in "
                         f"{config.parent})" if federation.hosts else "")
                where += " (on Podman)" if engine == "podman" else ""
                console.print(f"  spoke      {spoke_id}{where}")
            if broker is not None:  # processes on this machine: a sandbox spoke too
                sandbox_data = root / "data" / SANDBOX[0]
                generate_cohort(sandbox_data, 3, seed=7, site=SANDBOX[1])
                config = federation.add_spoke(SANDBOX[0], sandbox_data, name=SANDBOX[1],
                                              institution="the hub", sandbox=True,
                                              publisher_keys=(root / "publisher.key.pub",))
                federation.start_spoke(SANDBOX[0], config)
                console.print(f"  spoke      {SANDBOX[0]} (sandbox: 3 synthetic cases, runs "
                              "developers' unreviewed versions: tributary algorithm try)")
            # The hub refuses a launch to a spoke whose trust it has not heard yet.
            wait_for_trust(api, list(cohorts), timeout=120)
            algorithm = federation.register_algorithm(
                name="lung-nodule", version="1.0.0", repository=repository,
                digest=digest, argument_schema=schema, aggregator="nodule-detection",
                release_signature=release,
                description="Lung nodule candidates by thresholding and connected components")
            console.print("  approved by two reviewers of two organisations; "
                          "the hub signed the approval")

            console.rule("5. Study")
            access, committee = access_demo.approved_request(
                federation, api, "Nodule detection, demo study", list(cohorts), ["nodules"])
            console.print(f"  access request {access['id']} approved by the data access "
                          f"committee ({committee['username']})")
            experiment = api.post("/api/experiments", json={
                "name": "Nodule detection, demo study", "algorithm_id": algorithm["id"],
                "arguments": {"min_diameter_mm": 4.0}, "spoke_ids": list(cohorts),
                "release": ["nodules"], "limits": {"timeout_seconds": 600, "memory_mb": 1024},
                "access_request_id": access["id"],
            }).raise_for_status().json()
            api.post(f"/api/experiments/{experiment['id']}/launch").raise_for_status()
            console.print(f"  launched {experiment['id']} on {', '.join(cohorts)}")

            with Progress(TextColumn("  {task.description:<11}"), BarColumn(),
                          MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                          TimeElapsedColumn(), console=console) as progress:
                bars = {s: progress.add_task(s, total=None, note="queued") for s in cohorts}

                def show(exp: dict[str, Any]) -> None:
                    for target in exp["targets"]:
                        done = target["succeeded"] + target["failed"]
                        note = f"{target['state']}, {target['failed']} failed, " \
                               f"{target['running']} running"
                        progress.update(bars[target["spoke_id"]], total=target["case_count"],
                                        completed=done, note=note)

                federation.wait_for_experiment(experiment["id"], timeout=3600, on_progress=show)
            report = api.get(f"/api/experiments/{experiment['id']}/aggregate").json()
        if after_study is not None:
            after_study(federation, hub_side)

        console.rule("6. Results")
        console.print(aggregate_table(report))
        # The whole report (every figure with its interval, per spoke and pooled) for
        # whoever wants more than the table: the same JSON the API serves.
        (root / "results.json").write_text(json.dumps(report, indent=1) + "\n")
        console.print(f"\nDashboard: [bold]{federation.hub_url}/experiments/{experiment['id']}[/]"
                      f"   API: {federation.hub_url}/docs\nFull results: "
                      f"{root / 'results.json'}   logs: {root / 'logs'}")
        print_people(console, federation, root, developer, settings, committee)
        if wait:
            console.print("The federation keeps running; press Ctrl-C (or send SIGTERM) to "
                          "stop it.")
            while all(p.alive() for p in federation.processes.values()):
                time.sleep(1)
        return report
    except KeyboardInterrupt:
        return {}


def print_people(console: Console, federation: LocalFederation, root: Path,
                 developer: dict[str, Any], settings: ServiceSettings,
                 committee: dict[str, str] | None = None) -> None:
    """Who a developer can be in the running demo, and the publisher key to publish with
    (docs/algorithm-sdk.md, "Publishing into the demo")."""
    console.rule("Sign in")
    console.print(f"  {'admin':<11} password [bold]{federation.admin_password}[/]  "
                  "(administrator, coordinator: registers publishers, launches studies)")
    for username, password, organisation in federation.reviewers():
        console.print(f"  {username:<11} password [bold]{password}[/]  (reviewer, "
                      f"{organisation})")
    if developer:
        console.print(f"  {developer['username']:<11} password [bold]{developer['password']}"
                      "[/]  (developer: pushes to the registry)")
    if committee:
        console.print(f"  {committee['username']:<11} password [bold]{committee['password']}"
                      "[/]  (data access committee: decides access requests)")
    console.print("  These accounts are made for this demo run only.")
    console.print(f"  Publisher key: {root / 'publisher.key'} (public: "
                  f"{root / 'publisher.key.pub'}), registered at the hub as "
                  "[bold]Tributary examples[/] and trusted by every spoke")
    sites = sorted(p.parent.name for p in (root / "spokes").glob("*/spoke.toml")
                   if p.parent.name != SANDBOX[0])
    if sites:
        console.print("  Each site's configuration (its steward trusts a publisher with "
                      "[bold]tributary spoke trust add KEY.pub --config …[/]):")
        for site in sites:
            console.print(f"    {site:<11} {root / 'spokes' / site / 'spoke.toml'}",
                          soft_wrap=True)
    console.print("  Publish into it (docs/algorithm-sdk.md):\n"
                  f"    export TRIBUTARY_HUB_URL={federation.hub_url}\n"
                  "    export TRIBUTARY_TOKEN=$(tributary login admin)\n"
                  f"    tributary algorithm publish DIR --key {root / 'publisher.key'} "
                  f"--registry {settings.registry} --base-image {settings.base_image}",
                  soft_wrap=True)
