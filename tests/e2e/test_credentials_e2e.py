"""Participant credentials against the real hub process and broker: a hub that trusts a
federation authority refuses an expired, a revoked, a wrongly signed and a missing
membership credential at enrolment and again at launch (experiments, training studies), each
with its reason (422 at enrolment, 409 at launch, audited, shown on the dashboard), while a
member with a valid credential is launched to and really receives its experiment message.
Revocation counts from the next check: the authority republishes its status list and the
running hub refuses at once, without a restart."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from joserfc import jwt
from joserfc.jwk import OKPKey

from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.training.tensors import encode_tensors
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation
from tributary.testbed.simspoke import SimSpoke

pytestmark = pytest.mark.e2e

DIGEST = "sha256:" + "c" * 64


def resign(token: str, key: OKPKey) -> str:
    """The same header (the authority's kid) and claims, signed with another key: a forgery."""
    header_part, payload_part, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_part + "=="))
    claims = json.loads(base64.urlsafe_b64decode(payload_part + "=" * (-len(payload_part) % 4)))
    return jwt.encode(header, claims, key, algorithms=["Ed25519"])


def register(api: Any, spoke_id: str) -> None:
    api.post("/api/spokes", json={"id": spoke_id, "name": spoke_id}).raise_for_status()


def enrol(api: Any, spoke_id: str, key: SigningKey, credential: str | None) -> Any:
    body: dict[str, Any] = {"public_key_pem": key.public.pem}
    if credential is not None:
        body["credential"] = credential
    return api.post(f"/api/spokes/{spoke_id}/keys", json=body)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory,
          service_settings: ServiceSettings) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("credentials")
    federation = LocalFederation(root, service_settings, hub_env={
        "TRIBUTARY_HUB_VERIFY_REGISTRY": "false",
        "TRIBUTARY_HUB_CREDENTIAL_LEEWAY_SECONDS": "0",
        "TRIBUTARY_HUB_CREDENTIAL_CHECK_SECONDS": "1"})
    suffix = uuid.uuid4().hex[:6]
    legacy = f"legacy-{suffix}"
    try:
        # A spoke enrolled before the hub trusted any authority: no credential asked.
        federation.start_hub()
        with federation.api() as api:
            register(api, legacy)
            enrol(api, legacy, SigningKey.generate(), None).raise_for_status()
        federation.processes.pop("hub").stop()
        federation.authority = federation.start_authority()
        federation.start_hub()
        yield {"federation": federation, "suffix": suffix, "legacy": legacy}
    finally:
        federation.stop()


def test_expired_revoked_forged_and_missing_credentials_are_refused_at_enrolment(
        world: dict[str, Any]) -> None:
    federation: LocalFederation = world["federation"]
    suffix = world["suffix"]
    authority = federation.authority
    cases: dict[str, tuple[str | None, str]] = {}
    keys = {name: SigningKey.generate() for name in ("missing", "expired", "revoked", "forged")}
    ids = {name: f"{name}-e-{suffix}" for name in keys}
    cases["missing"] = (None, "no membership credential was presented")
    cases["expired"] = (federation.issue_credential(
        ids["expired"], [keys["expired"].keyid], timedelta(days=1),
        datetime.now(UTC) - timedelta(days=2)), "expired at")
    revoked = federation.issue_credential(ids["revoked"], [keys["revoked"].keyid])
    authority.revoke(authority.state.issued[-1].id, "left the federation")
    cases["revoked"] = (revoked, "revoked by did:web:authority.")
    cases["forged"] = (resign(federation.issue_credential(ids["forged"], [keys["forged"].keyid]),
                              OKPKey.generate_key("Ed25519")), "signature does not verify")
    with federation.api() as api:
        for name, (credential, reason) in cases.items():
            register(api, ids[name])
            refused = enrol(api, ids[name], keys[name], credential)
            assert refused.status_code == 422, (name, refused.text)
            assert "credential refused" in refused.json()["detail"], name
            assert reason in refused.json()["detail"], (name, refused.text)
            assert api.get(f"/api/spokes/{ids[name]}/keys").json() == [], name
            events = api.get("/api/audit", params={"action": "credential.refused",
                                                   "target": ids[name]}).json()
            assert events and reason in events[0]["detail"]["reason"], name
        # A credential for another spoke, or that does not name the key, is no better.
        other = SigningKey.generate()
        stolen = federation.issue_credential(f"valid-e-{suffix}", [other.keyid])
        register(api, f"thief-{suffix}")
        thief = enrol(api, f"thief-{suffix}", other, stolen)
        assert thief.status_code == 422 and "is for spoke" in thief.text
        register(api, f"valid-e-{suffix}")
        wrong_key = enrol(api, f"valid-e-{suffix}", SigningKey.generate(), stolen)
        assert wrong_key.status_code == 422 and "does not name the spoke's signing key" in \
            wrong_key.text
        assert enrol(api, f"valid-e-{suffix}", other, stolen).status_code == 201


def test_expired_revoked_forged_and_missing_credentials_are_refused_at_launch(
        world: dict[str, Any]) -> None:
    federation: LocalFederation = world["federation"]
    suffix, authority = world["suffix"], federation.authority
    member = SimSpoke(f"member-{suffix}")
    expiring, revoked, forged = (f"{n}-l-{suffix}" for n in ("expiring", "revoked", "forged"))
    keys = {s: SigningKey.generate() for s in (expiring, revoked, forged)}
    with federation.api() as api:
        register(api, member.spoke_id)
        enrol(api, member.spoke_id, member.key, federation.issue_credential(
            member.spoke_id, [member.key.keyid])).raise_for_status()
        for spoke_id, key in keys.items():
            register(api, spoke_id)
            valid_for = timedelta(seconds=4) if spoke_id == expiring else timedelta(days=30)
            enrol(api, spoke_id, key, federation.issue_credential(
                spoke_id, [key.keyid], valid_for)).raise_for_status()
            assert api.get(f"/api/spokes/{spoke_id}/credential").json()["state"] == "valid"
    # After enrolment: the authority revokes one, someone with write access to the hub's
    # database swaps in a forged credential for another, and the third expires.
    authority.revoke(next(c.id for c in authority.state.issued if c.spoke_id == revoked),
                     "audit found the site non-compliant")
    with sqlite3.connect(federation.hub_dir / "hub.db") as db:
        (token,) = db.execute("SELECT token FROM spokecredential WHERE spoke_id = ?",
                              (forged,)).fetchone()
        db.execute("UPDATE spokecredential SET token = ? WHERE spoke_id = ?",
                   (resign(token, OKPKey.generate_key("Ed25519")), forged))
    time.sleep(5)
    reasons = {world["legacy"]: "no membership credential was presented",
               expiring: "expired at", revoked: "revoked by did:web:authority.",
               forged: "signature does not verify"}
    algorithm = federation.register_algorithm(name=f"cred-{suffix}", version="1",
                                              repository="cred/alg", digest=DIGEST)
    with federation.api() as api:
        experiment = api.post("/api/experiments", json={
            "name": "members only", "algorithm_id": algorithm["id"],
            "spoke_ids": [member.spoke_id, *reasons]}).raise_for_status().json()
        refused = api.post(f"/api/experiments/{experiment['id']}/launch")
        assert refused.status_code == 409, refused.text
        found = {r["spoke_id"]: r["reason"] for r in refused.json()["detail"]["refusals"]}
        assert set(found) == set(reasons)  # the member is not refused
        for spoke_id, reason in reasons.items():
            assert "membership credential refused" in found[spoke_id]
            assert reason in found[spoke_id], (spoke_id, found[spoke_id])
        again = api.get(f"/api/experiments/{experiment['id']}").json()
        assert again["state"] == "draft"
        assert {t["state"] for t in again["targets"]} == {"pending"}  # nothing was sent
        audited = api.get("/api/audit", params={"action": "experiment.launch_refused",
                                                "target": experiment["id"]}).json()
        assert {r["spoke_id"] for r in audited[0]["detail"]["refusals"]} == set(reasons)

        # The training launch refuses the same spokes, before anything is created.
        initial = base64.b64encode(encode_tensors({"w": np.zeros(3)})).decode()
        training = api.post("/api/training-studies", json={
            "name": f"train-{suffix}", "algorithm_id": algorithm["id"],
            "spokes": [member.spoke_id, *reasons], "rounds": 1, "clip_bound": 1.0,
            "noise_multiplier": 1.0, "epsilon_budget": 10.0, "delta": 1e-5,
            "initial_model_b64": initial})
        assert training.status_code == 409, training.text
        listed = {r["spoke_id"]: r["reason"] for r in training.json()["detail"]["refusals"]}
        assert set(listed) == set(reasons)
        assert all(reasons[s] in listed[s] for s in reasons)
        assert api.get("/api/audit", params={"action": "training.launch_refused",
                                             "target": f"train-{suffix}"}).json()

        # So do a private set intersection and a vertical study, before anything is sent
        # or created.
        for path, body, action, target in (
                ("/api/psi", {"mode": "cardinality", "spoke_ids": [member.spoke_id, *reasons],
                              "purpose": f"psi-{suffix}"}, "psi.launch_refused",
                 f"psi-{suffix}"),
                ("/api/vertical-studies", {
                    "name": f"vertical-{suffix}", "psi_id": "psi-1",
                    "features_spoke": member.spoke_id, "label_spoke": revoked,
                    "features_attributes": ["f"], "label_attributes": ["g"], "label": "y",
                    "positive": 1},
                 "vertical.launch_refused", f"vertical-{suffix}")):
            answer = api.post(path, json=body)
            assert answer.status_code == 409, (path, answer.text)
            listed = {r["spoke_id"]: r["reason"] for r in answer.json()["detail"]["refusals"]}
            assert member.spoke_id not in listed and all(
                reasons[s] in listed[s] for s in listed), listed
            assert api.get("/api/audit", params={"action": action, "target": target}).json()
        assert api.get("/api/psi").json() == []
        assert api.get("/api/vertical-studies").json() == []

        # The periodic check recorded each lapse, and the dashboard shows it with its reason.
        for spoke_id in (expiring, revoked):
            events = api.get("/api/audit", params={"action": "credential.refused",
                                                   "target": spoke_id}).json()
            assert events and reasons[spoke_id] in events[0]["detail"]["reason"]
        page = api.get("/spokes").text
        assert "Membership" in page and "no credential" in page
        assert "audit found" not in page and reasons[revoked] in page

        # The member alone is launched to, and its experiment really crosses the broker.
        alone = api.post("/api/experiments", json={
            "name": "member", "algorithm_id": algorithm["id"],
            "spoke_ids": [member.spoke_id]}).raise_for_status().json()
        launched = api.post(f"/api/experiments/{alone['id']}/launch")
        assert launched.status_code == 200, launched.text
    client = StompClient(BrokerSettings(host=federation.services.host,
                                        port=federation.services.broker_port,
                                        federation=federation.federation), "member").start(30)
    try:
        hub_keys = [PublicKey.load(Path(f"{federation.hub_key_path}.pub"))]
        assert member.receive_experiment(client, hub_keys).experiment_id == alone["id"]
    finally:
        client.close()


def test_a_renewed_credential_restores_membership(world: dict[str, Any]) -> None:
    """Rotation: the authority issues a new credential; the administrator presents it."""
    federation: LocalFederation = world["federation"]
    legacy = world["legacy"]
    with federation.api() as api:
        keyids = [k["keyid"] for k in api.get(f"/api/spokes/{legacy}/keys").json()]
        assert api.get(f"/api/spokes/{legacy}/credential").json()["state"] == "missing"
    # The administrator presents it with the CLI, from the file the authority sent.
    federation.issue_credential(legacy, keyids)
    presented = subprocess.run(
        [sys.executable, "-m", "tributary.cli", "federation", "present", legacy,
         str(federation.root / "spokes" / legacy / "membership.jwt"), "--hub",
         federation.hub_url, "--token", federation.admin_token],
        capture_output=True, text=True, timeout=120)
    assert presented.returncode == 0, presented.stderr
    assert f"{legacy}: valid" in presented.stdout
    with federation.api() as api:
        renewed = api.get(f"/api/spokes/{legacy}/credential").json()
        assert renewed["state"] == "valid" and renewed["keyids"] == keyids
        junk = api.put(f"/api/spokes/{legacy}/credential", json={"credential": "x.y.z"})
        assert junk.status_code == 422 and "not a compact JWS" in junk.text
        # the refused one replaced nothing
        assert api.get(f"/api/spokes/{legacy}/credential").json()["state"] == "valid"
