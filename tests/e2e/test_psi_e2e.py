"""Private set intersection end to end: a real hub process, real spoke processes and the
real broker. Spokes with synthetic consortium identifiers of known overlap find how many
patients they share (cardinality) or link them with PSI-scoped pseudonyms (intersection),
two and three at a time, after their data stewards approved; a refusal reaches the hub with
its reason. Nothing the hub relayed carries an identifier or a plain hash of one."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import sqlite3
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import steward

from tributary.protocol.auditlog import read_entries
from tributary.protocol.bundle import MANIFEST, MANIFEST_PAYLOAD_TYPE, MANIFEST_SIGNATURE
from tributary.protocol.signing import PublicKey, verify
from tributary.spoke.config import SpokeConfig
from tributary.spoke.linkage import Linkage
from tributary.spoke.psi_identifiers import link_identifiers
from tributary.testbed.federation import LocalFederation

pytestmark = pytest.mark.e2e

K = 5


def consortium_id(i: int) -> str:
    return f"NL-CONS-{i:06d}"


#: Who holds which consortium ids: A∩B = 10..29 (20), A∩C = 15..24 (10), B∩C = 15..24 and
#: 40..44, A∩B∩C = 15..24 (10), A∩D = 0..2 (3, under k).
HOLDINGS = {
    "a": list(range(0, 30)),
    "b": list(range(10, 45)),
    "c": [*range(15, 25), *range(40, 50)],
    "d": [0, 1, 2, 100, 101, 102, 103, 104],
}


def _write_attributes(data: Path, site: str, ids: list[int]) -> None:
    data.mkdir(parents=True, exist_ok=True)
    lines = ["patient_id,consortium_id,age"]
    lines += [f"{site.upper()}-MRN-{i:04d},{consortium_id(i)},{40 + i % 30}" for i in ids]
    (data / "attributes.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def sites(federation: LocalFederation) -> dict[str, tuple[str, Path]]:
    """Four spokes; the stewards of ``a`` and ``c`` approve PSIs, ``b`` and ``d`` take part
    by policy (``approve_psi = false``)."""
    import uuid

    tag = uuid.uuid4().hex[:6]
    out: dict[str, tuple[str, Path]] = {}
    for site, ids in HOLDINGS.items():
        spoke_id = f"psi{site}-{tag}"
        data = federation.root / "psi-data" / spoke_id
        _write_attributes(data, site, ids)
        config = federation.add_spoke(
            spoke_id, data, counts={"min_cell": K},
            cohorts={"link_identifier": "consortium_id", "approve_psi": site in "ac"})
        federation.start_spoke(spoke_id, config)
        out[site] = (spoke_id, config)
    return out


def _create(federation: LocalFederation, mode: str, spokes: list[str],
            purpose: str = "feasibility of the joint lung cohort") -> str:
    with federation.api() as api:
        response = api.post("/api/psi", json={"mode": mode, "spoke_ids": spokes,
                                               "purpose": purpose})
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


def _approve_where_asked(sites: dict[str, tuple[str, Path]], psi_id: str,
                         members: str) -> None:
    for site in members:
        if site not in "ac":
            continue
        config = sites[site][1]
        deadline = time.monotonic() + 60
        while True:
            shown = steward(config, "psi", "pending", "--json")
            assert shown.returncode == 0, shown.stderr
            held = {r["psi_id"]: r for r in json.loads(shown.stdout)}
            if psi_id in held:
                break
            assert time.monotonic() < deadline, f"{psi_id} never held at {site}"
            time.sleep(0.3)
        item = held[psi_id]
        # The steward sees who asked, why, the mode and the partner spokes.
        assert item["purpose"] and item["requested_by"] == "admin"
        assert set(item["partners"]) == {sites[s][0] for s in members if s != site}
        done = steward(config, "psi", "approve", psi_id, "--as", "dr-steward")
        assert done.returncode == 0, done.stdout + done.stderr


def _wait(federation: LocalFederation, psi_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    with federation.api() as api:
        while True:
            run = api.get(f"/api/psi/{psi_id}").raise_for_status().json()
            if run["state"] in ("done", "refused", "failed"):
                return dict(run)
            dead = [p for p in federation.processes.values() if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"PSI {psi_id} unfinished: {run}")
            time.sleep(0.3)


def _run(federation: LocalFederation, sites: dict[str, tuple[str, Path]], mode: str,
         members: str) -> dict[str, Any]:
    psi_id = _create(federation, mode, [sites[s][0] for s in members])
    _approve_where_asked(sites, psi_id, members)
    return _wait(federation, psi_id)


def _linked(config: Path, psi_id: str) -> dict[str, str]:
    """pseudonym → the consortium id of its case at that spoke (read in the test only)."""
    loaded = SpokeConfig.load(config)
    by_case = {case: identifier for identifier, case in link_identifiers(loaded).items()}
    with Linkage(loaded.work_dir) as linkage:
        return {p: by_case[case] for p, case in linkage.cases(psi_id)}


def test_cardinality_two_and_three_spokes(federation: LocalFederation,
                                          sites: dict[str, tuple[str, Path]]) -> None:
    two = _run(federation, sites, "cardinality", "ab")
    assert (two["state"], two["count"], two["result_text"]) == ("done", 20, "20"), two
    three = _run(federation, sites, "cardinality", "abc")
    assert (three["state"], three["count"], three["result_text"]) == ("done", 10, "10"), three
    # Cardinality mode links nobody.
    for site in "abc":
        assert _linked(sites[site][1], three["id"]) == {}
    # Under k: only "fewer than k" reaches the coordinator, and no spoke links anyone.
    small = _run(federation, sites, "cardinality", "ad")
    assert (small["count"], small["fewer_than"], small["result_text"]) == (
        None, K, f"fewer than {K}"), small
    # The dashboard lists them with their states; a reviewer may not see them; the hub
    # audited each request and relay (sizes, never content).
    with federation.api() as api:
        page = api.get("/psi").text
        audit = api.get("/api/audit", params={"target": three["id"]}).json()
    assert three["id"] in page and "fewer than 5" in page and "(leader)" in page
    with federation.api(federation.reviewer_tokens()[0]) as other:
        assert other.get("/psi").status_code == 403
        assert other.get("/api/psi").status_code == 403
    actions = {a["action"] for a in audit}
    assert {"psi.requested", "message.sent", "psi.status", "psi.relay_received",
            "psi.relayed", "psi.done"} <= actions, actions
    relayed = [a["detail"] for a in audit if a["action"] == "psi.relayed"]
    assert relayed and all(set(d) >= {"size", "step", "from_spoke", "to_spoke"}
                           and "payload" not in d for d in relayed)


def test_intersection_two_and_three_spokes(federation: LocalFederation,
                                           sites: dict[str, tuple[str, Path]]) -> None:
    two = _run(federation, sites, "intersection", "ab")
    assert (two["state"], two["result_text"]) == ("done", "linked cohort of 20"), two
    at_a, at_b = _linked(sites["a"][1], two["id"]), _linked(sites["b"][1], two["id"])
    assert at_a == at_b  # the same pseudonym stands for the same patient at both
    assert sorted(at_a.values()) == [consortium_id(i) for i in range(10, 30)]

    three = _run(federation, sites, "intersection", "abc")
    assert three["result_text"] == "linked cohort of 10", three
    tables = [_linked(sites[s][1], three["id"]) for s in "abc"]
    assert tables[0] == tables[1] == tables[2]
    assert sorted(tables[0].values()) == [consortium_id(i) for i in range(15, 25)]
    # Pseudonyms are scoped to the PSI: the same patients get others in another PSI.
    assert not set(tables[0]) & set(at_a)

    small = _run(federation, sites, "intersection", "ad")
    assert small["result_text"] == f"fewer than {K}" and small["count"] is None
    assert _linked(sites["a"][1], small["id"]) == {} == _linked(sites["d"][1], small["id"])

    # The PSI's bundle: its request, states, result and audit trail, signed by the hub.
    with federation.api() as api:
        download = api.get(f"/api/psi/{three['id']}/bundle")
    assert download.status_code == 200, download.text
    root = federation.root / "psi-bundle"
    archive = root / "psi.zip"
    root.mkdir(exist_ok=True)
    archive.write_bytes(download.content)
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(root / "unpacked")
    unpacked = root / "unpacked"
    hub_key = PublicKey.load(Path(f"{federation.hub_key_path}.pub"))
    manifest = verify(json.loads((unpacked / MANIFEST_SIGNATURE).read_text()), [hub_key],
                      MANIFEST_PAYLOAD_TYPE).decode()
    assert manifest == (unpacked / MANIFEST).read_text()
    for line in manifest.splitlines():
        digest, _, name = line.partition("  ")
        assert hashlib.sha256((unpacked / name).read_bytes()).hexdigest() == digest, name
    described = json.loads((unpacked / "experiment.json").read_text())
    assert described["psi"]["result_text"] == "linked cohort of 10"
    assert "psi.relayed" in {e["action"] for e in described["audit"]}


def test_a_steward_refusal_reaches_the_hub(federation: LocalFederation,
                                           sites: dict[str, tuple[str, Path]]) -> None:
    psi_id = _create(federation, "intersection", [sites["b"][0], sites["c"][0]])
    config = sites["c"][1]
    deadline = time.monotonic() + 60
    while psi_id not in steward(config, "psi", "pending", "--json").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    done = steward(config, "psi", "refuse", psi_id, "--reason", "no ethics approval yet",
                   "--as", "dr-steward")
    assert done.returncode == 0, done.stdout + done.stderr
    run = _wait(federation, psi_id)
    assert run["state"] == "refused" and run["result_text"] == "refused"
    refused = {s["spoke_id"]: s for s in run["spokes"]}[sites["c"][0]]
    assert "no ethics approval yet" in refused["reason"] and "dr-steward" in refused["reason"]
    assert _linked(sites["b"][1], psi_id) == {}


def test_a_leader_killed_mid_psi_finishes_it_after_its_restart(
        federation: LocalFederation, sites: dict[str, tuple[str, Path]]) -> None:
    """kill -9 of the leader after it said hello and before its partner's steward decided:
    what it journaled (secrets, identifiers' snapshot) and what waits for it on the broker
    carry the PSI to the end, each step once."""
    leader, config = sites["b"]
    psi_id = _create(federation, "intersection", [leader, sites["c"][0]])
    deadline = time.monotonic() + 60
    with federation.api() as api:
        while {s["spoke_id"]: s["state"] for s in api.get(f"/api/psi/{psi_id}").json()[
                "spokes"]}[leader] != "approved":
            assert time.monotonic() < deadline
            time.sleep(0.3)
    process = federation.processes[f"spoke-{leader}"]
    process.popen.send_signal(signal.SIGKILL)
    process.popen.wait(10)
    _approve_where_asked(sites, psi_id, "bc")  # only c's steward is asked
    time.sleep(2)  # the partner's hello waits for the leader on the broker
    federation.start_spoke(leader, config)
    run = _wait(federation, psi_id)
    assert run["result_text"] == "linked cohort of 15", run
    shared = sorted(consortium_id(i) for i in [*range(15, 25), *range(40, 45)])
    assert sorted(_linked(config, psi_id).values()) == shared
    assert _linked(config, psi_id) == _linked(sites["c"][1], psi_id)
    with federation.api() as api:
        steps = [a["detail"]["step"] for a in api.get(
            "/api/audit", params={"target": psi_id, "action": "psi.relayed"}).json()]
    assert sorted(steps) == ["hello", "hello", "link", "request", "response"]


def _forms(identifier: str) -> set[bytes]:
    """An identifier as it could leak: raw, its SHA-1/SHA-256/MD5 (hex and raw), and the
    base64 of each."""
    raw = identifier.encode()
    forms = {raw}
    for name in ("sha1", "sha256", "md5"):
        digest = hashlib.new(name, raw).digest()
        forms |= {digest, digest.hex().encode(), digest.hex().upper().encode()}
    forms |= {base64.b64encode(f) for f in list(forms)}
    forms |= {base64.urlsafe_b64encode(f).rstrip(b"=") for f in list(forms)}
    return forms


def _relayed(sites: dict[str, tuple[str, Path]]) -> list[bytes]:
    """Every message the hub relayed, as the spokes sent it (their outbox) and as they
    received it (their PSI inbox), with each payload also base64-decoded."""
    out: list[bytes] = []
    for _, config in sites.values():
        db = sqlite3.connect(SpokeConfig.load(config).work_dir / "journal.db")
        try:
            sent = [r[0] for r in db.execute("SELECT body FROM outbox WHERE kind='psi_relay'")]
            received = [r[0] for r in db.execute("SELECT message FROM psi_inbox")]
        finally:
            db.close()
        for envelope in sent:
            out.append(envelope.encode())
            message = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
            out.append(json.dumps(message).encode())
            out.append(base64.b64decode(message["payload"]))
        for text in received:
            out.append(text.encode())
            out.append(base64.b64decode(json.loads(text)["payload"]))
    return out


def test_nothing_relayed_carries_an_identifier(federation: LocalFederation,
                                               sites: dict[str, tuple[str, Path]]) -> None:
    """Runs after the PSIs above (or runs its own): scans every relayed message and the
    hub's audit trail for every identifier of every site, in every plain form."""
    if not _relayed(sites):
        _run(federation, sites, "intersection", "abc")
    relayed = _relayed(sites)
    steps = {json.loads(m)["step"] for m in relayed if m.startswith(b"{\"protocol_version")}
    assert {"hello", "request", "response"} <= steps, steps
    identifiers = {consortium_id(i) for ids in HOLDINGS.values() for i in ids}
    leaks = [(identifier, form) for identifier in identifiers for form in _forms(identifier)
             for message in relayed if form in message]
    assert leaks == []
    # The hub kept sizes, never payloads, and its audit trail names no identifier.
    with federation.api() as api:
        audit = api.get("/api/audit", params={"limit": 5000}).raise_for_status().text
    assert not [i for i in identifiers if i in audit]
    assert "psi.relayed" in audit
    hub_log = federation.hub_audit_log
    assert hub_log.exists()
    lines = b"".join(json.dumps(entry).encode() for _, entry in read_entries(hub_log))
    assert b"psi.relayed" in lines
    assert not [i for i in identifiers if i.encode() in lines]
