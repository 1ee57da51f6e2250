"""Parties on separate hosts (network namespaces, see tributary.testbed.hosts): the demo
study with broker (mutual TLS), registry (TLS gateway, hub-issued tokens) and hub (HTTPS) on
the hub side and each spoke on its own host gives the same figures as on loopback; the
firewalls let exactly the published ports through, and each of them speaks only TLS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tributary.services.system import free_port, read_pid
from tributary.testbed.demo import run_demo
from tributary.testbed.federation import LocalFederation
from tributary.testbed.hosts import HUB, ROOT, Hosts, available
from tributary.testbed.hub_side import HubSide

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(available() is not None,
                                 reason=f"separate hosts cannot be simulated: {available()}")]
SPOKES = ("northfield", "riverside")
CASES = [3, 2]  # five cases pooled: the smallest study whose pooled figures are not withheld


def _figures(report: dict[str, Any]) -> dict[str, Any]:
    """What a study computed, without what names or times one run."""
    return {"columns": report["columns"], "results": report["results"],
            "groups": report["groups"]}


def _netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _objects(hosts: Hosts, party: str, credentials: Path, *calls: str) -> list[str]:
    """What each object store call gives, made from ``party``'s host with its credentials:
    "ok", "refused" or the error's class."""
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from tributary.protocol import objects as o\n"
        "store = o.ObjectStore.from_file(Path(sys.argv[1]))\n"
        "for call in sys.argv[2:]:\n"
        "    try:\n"
        "        eval(call, {'s': store, 'o': o})\n        print('ok')\n"
        "    except o.ObjectStoreRefused:\n        print('refused')\n"
        "    except Exception as exc:\n        print(type(exc).__name__)\n")
    done = hosts.run(party, [sys.executable, "-c", script, str(credentials), *calls],
                     capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def _check_running(federation: LocalFederation, hub_side: HubSide | None,
                   found: dict[str, Any]) -> None:
    """Called while the study's federation still runs: where each party is, what each
    host can reach, and that every published port speaks only TLS."""
    hosts = federation.hosts
    assert hosts is not None and federation.secure_broker is not None
    assert hub_side is not None
    hub, broker_port = hosts.hub_address, federation.secure_broker.stomp_ssl_port

    # Each process really runs in its party's namespace.
    def netns_inode(party: str) -> int:
        return os.stat(f"/run/netns/{hosts.netns(party)}").st_ino

    broker_pid = read_pid(federation.secure_broker.instance_dir / "broker.pid")
    assert broker_pid is not None and _netns_of(broker_pid) == netns_inode(HUB)
    assert _netns_of(federation.processes["hub"].popen.pid) == netns_inode(HUB)
    for spoke in SPOKES:
        assert _netns_of(federation.processes[f"spoke-{spoke}"].popen.pid) == netns_inode(spoke)
        assert netns_inode(spoke) != netns_inode(HUB) != _netns_of(os.getpid())

    # No shared folders: every file a spoke's config names is in its own folder.
    for spoke in SPOKES:
        folder = federation.root / "spokes" / spoke
        config = tomllib.loads((folder / "spoke.toml").read_text())
        named = [config["work_dir"], config["data_dir"], config["hub_public_key"],
                 *(config["broker"][k] for k in ("ca_file", "cert_file", "key_file")),
                 *config["trust"]["publisher_keys"], config["registry"]["ca_file"]]
        assert all(Path(p).is_relative_to(folder) for p in named), named

    # The broker's port: TLS verifying against the federation CA, with the spoke's own
    # identity, from the spoke's host; a plaintext STOMP CONNECT gets no STOMP answer.
    north = federation.root / "spokes" / "northfield" / "broker"
    assert hosts.speaks_tls("northfield", hub, broker_port, north / "ca.crt",
                            north / "client.crt", north / "client.key")
    assert hosts.plain_connection_refused("northfield", hub, broker_port, "stomp")
    # The hub's API and the registry (its gateway): HTTPS with certificates of the same CA,
    # no answer to plain HTTP, from the coordinator's (and engine's) machine and from a
    # spoke's host alike.
    assert federation.hub_url.startswith("https://") and federation.hub_ca is not None
    registry_host, registry_port = federation.services.registry.rsplit(":", 1)
    assert registry_host == hub
    for party in (ROOT, "riverside"):
        for port in (federation.hub_port, int(registry_port)):
            assert hosts.speaks_tls(party, hub, port, federation.hub_ca)
            assert hosts.plain_connection_refused(party, hub, port, "http")
    # The object store: HTTPS from a spoke's host, with that spoke's own S3 identity: it
    # writes its own round and reads global models, and nothing else.
    store_port = hub_side.objectstore_port
    assert hosts.speaks_tls("northfield", hub, store_port, federation.hub_ca)
    assert hosts.plain_connection_refused("northfield", hub, store_port, "http")
    hub_store = federation.root / "hub" / "objectstore.json"
    shutil.copyfile(hub_side.root / "pki" / "hub" / "objectstore.json", hub_store)
    shutil.copyfile(hub_side.ca_file, hub_store.parent / "ca.crt")
    assert _objects(hosts, HUB, hub_store,
                    "s.put(o.global_model_key(1), b'global model')") == ["ok"]
    north = hub_side.spoke_objectstore("northfield", federation.root / "spokes" / "northfield"
                                       / "objectstore")
    assert _objects(hosts, "northfield", north,
                    "s.put(o.round_update_key('northfield', 1), b'update')",
                    "s.get(o.global_model_key(1))",
                    "s.put(o.round_update_key('riverside', 1), b'forged')",
                    "s.put(o.global_model_key(2), b'forged')") == [
        "ok", "ok", "refused", "refused"]
    # Every published port answers only TLS: the broker, hub, registry and object store are
    # all there is.
    assert sorted(hosts.ports) == sorted({broker_port, federation.hub_port,
                                          int(registry_port), store_port})

    # A port of the hub side that is not published: open on the hub's own host only.
    unpublished = free_port()
    hosts.listen(HUB, unpublished)
    assert hosts.can_connect(HUB, hub, unpublished)
    for party in (*SPOKES, ROOT):
        assert not hosts.can_connect(party, hub, unpublished), party
    # Nothing gets into a spoke's host, from the hub side or from the other spoke.
    riverside, inside = hosts.host("riverside").address, free_port()
    hosts.listen("riverside", inside)
    assert hosts.can_connect("riverside", riverside, inside)
    assert not hosts.can_connect("northfield", riverside, inside)
    assert not hosts.can_connect(HUB, riverside, inside)
    # And a spoke reaches nothing but the hub address, not even the engine's host.
    assert not hosts.can_connect("northfield", hosts.host(ROOT).address, unpublished)
    found["checked"] = True


def test_study_on_separate_hosts_gives_the_loopback_figures(tmp_path: Path) -> None:
    with open(tmp_path / "loopback.log", "w") as log:
        loopback = run_demo(CASES, hub_port=free_port(), wait=False,
                            workdir=tmp_path / "loopback", console=Console(file=log))
    found: dict[str, Any] = {}
    with Hosts(list(SPOKES)) as hosts, open(tmp_path / "hosts.log", "w") as log:
        apart = run_demo(CASES, hub_port=free_port(), wait=False, workdir=tmp_path / "apart",
                         console=Console(file=log, width=120), hosts=hosts,
                         after_study=lambda fed, side: _check_running(fed, side, found))
        prefix = hosts.prefix
    assert found == {"checked": True}
    pooled = apart["groups"]["pooled"]
    assert (pooled["cases"], pooled["succeeded"], pooled["failed"]) == (5, 5, 0)
    assert pooled["figures"]["true_positives"]["value"] is not None  # figures, not withheld
    assert _figures(apart) == _figures(loopback)
    log_text = (tmp_path / "hosts.log").read_text()
    assert f"{prefix}-hub" in log_text and f"{prefix}-s0" in log_text  # who is where
    # Everything is gone afterwards.
    assert prefix not in _namespaces()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert prefix not in links
    assert json.loads((tmp_path / "apart" / "results.json").read_text()) == apart


def test_a_killed_runs_hosts_are_removed_by_the_next(tmp_path: Path) -> None:
    """A run killed before it could clean up leaves its namespaces; the next set removes
    them (and only the sets whose owner is gone)."""
    script = ("import sys, time\nfrom tributary.testbed.hosts import Hosts\n"
              "h = Hosts(['a'], prefix=sys.argv[1]); h.setup()\n"
              "print('ready', flush=True); time.sleep(600)\n")
    prefix = f"tk{os.getpid() % 100000}"
    victim = subprocess.Popen([sys.executable, "-c", script, prefix], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        with Hosts(["b"]):  # its owner is alive: left alone
            assert f"{prefix}-hub" in _namespaces()
        victim.kill()
        victim.wait()
        assert f"{prefix}-s0" in _namespaces()
        with Hosts(["c"]) as other:
            assert f"{other.prefix}-hub" in _namespaces()
            assert prefix not in _namespaces()
    finally:
        victim.kill()
        victim.wait()
        if victim.stdout is not None:
            victim.stdout.close()
        Hosts(["d"], prefix=prefix).close()
