"""The federation's one PKI, end to end: `tributary pki issue` gives every party and endpoint a
certificate from one CA, spokes report their certificate's expiry in their heartbeats and the
spokes page shows it, `tributary pki status` watches expiry, and `tributary pki revoke`
takes a spoke out at the hub (keys, registry tokens), on the broker and in the object store
together while the other spoke goes on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509

from tributary.protocol.broker import StompClient
from tributary.protocol.objects import (
    ObjectStore,
    ObjectStoreRefused,
    global_model_key,
    round_update_key,
)
from tributary.protocol.registry_auth import spoke_assertion
from tributary.protocol.signing import SigningKey
from tributary.services import federation_pki, objectstore
from tributary.services.broker_security import load_bundle, start_broker, stop_broker
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


TOKEN_SERVICE = "tributary-registry"


def _tributary(*args: str, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tributary.cli", *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


def _wait(check, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_one_pki_expiry_on_the_spokes_page_and_revocation(
        tmp_path: Path, short_tmp: Path, service_settings: ServiceSettings) -> None:
    spokes = [f"pki-{uuid.uuid4().hex[:6]}", f"pki-{uuid.uuid4().hex[:6]}"]
    kept, revoked = spokes
    out = tmp_path / "pki"
    # The hub host's object store, in a state folder of this test's own.
    store = ServiceSettings(state_dir=short_tmp, objectstore_port=free_port())
    env = {"TRIBUTARY_STATE_DIR": str(store.state_dir),
           "TRIBUTARY_OBJECTSTORE_PORT": str(store.objectstore_port)}
    issued = _tributary("pki", "issue", "--out", str(out), "--hub-name", "127.0.0.1",
                        "--broker-port", str(free_port()), "--spoke", kept, "--spoke", revoked,
                        "--objectstore", env=env)
    assert issued.returncode == 0, issued.stdout + issued.stderr
    certs = federation_pki.inventory(out, store)
    ca = x509.load_pem_x509_certificate((out / "pki" / "ca.crt").read_bytes())
    holders = {"federation", "broker", "hub", "registry", "objectstore", kept, revoked}
    assert {c.holder for c in certs} == holders
    for cert in certs[1:]:  # every one from the federation CA
        x509.load_pem_x509_certificate(cert.path.read_bytes()).verify_directly_issued_by(ca)
    assert _tributary("pki", "status", "--out", str(out), env=env).returncode == 0
    # Everything expires within a long enough window: status tells monitoring so.
    assert _tributary("pki", "status", "--out", str(out), "--warn-days", "100000",
                      env=env).returncode == 1

    bundle = load_bundle(out)
    signer = out / federation_pki.TOKEN_SIGNER_DIR
    federation = LocalFederation(tmp_path / "federation", service_settings,
                                 secure_broker=bundle, hub_env={
        "TRIBUTARY_HUB_REGISTRY_TOKEN_KEY": str(signer / "client.key"),
        "TRIBUTARY_HUB_REGISTRY_TOKEN_CERT": str(signer / "client.crt"),
        "TRIBUTARY_HUB_REGISTRY_TOKEN_SERVICE": TOKEN_SERVICE})
    try:  # the broker and the store are stopped whatever fails, their start included
        start_broker(bundle)
        objectstore.ensure_running(store, ca_dir=out / "pki")
        sites = {s: ObjectStore.from_file(out / "identities" / s / "objectstore.json")
                 for s in spokes}
        hub_store = ObjectStore.from_file(out / "hub" / "objectstore.json")
        hub_store.put(global_model_key(1), b"global model 1")
        for spoke_id, site in sites.items():
            assert site.get(global_model_key(1)) == b"global model 1"
            site.put(round_update_key(spoke_id, 1), b"update")
        federation.start_hub()
        for index, spoke_id in enumerate(spokes):
            data = federation.root / "data" / spoke_id
            generate_cohort(data, 1, seed=60 + index, site=spoke_id)
            federation.start_spoke(spoke_id, federation.add_spoke(spoke_id, data))

        def reported() -> dict[str, dict[str, object]] | None:
            with federation.api() as api:
                rows = {s["id"]: s for s in api.get("/api/spokes").raise_for_status().json()}
            return rows if all(rows[s]["certificate_not_after"] for s in spokes) else None

        rows = _wait(reported, 60, "both spokes' certificates in their heartbeats")
        for spoke_id in spokes:
            cert = next(c for c in certs if c.holder == spoke_id)
            assert rows[spoke_id]["certificate_serial"] == cert.serial
            assert rows[spoke_id]["certificate_state"] == "ok"
            assert 700 <= rows[spoke_id]["certificate_days_left"] <= 731
        with federation.api() as api:
            page = api.get("/spokes").raise_for_status().text
        assert page.count("days left") == 2

        def registry_token(spoke_id: str) -> int:
            key = SigningKey.load(federation.root / "spokes" / spoke_id / "spoke.key")
            with federation.client() as client:
                return client.get("/api/registry/token", params={
                    "service": TOKEN_SERVICE, "scope": "repository:any/image:pull"},
                    auth=(spoke_id, spoke_assertion(key, spoke_id, TOKEN_SERVICE))
                ).status_code

        assert registry_token(revoked) == 200

        result = _tributary("pki", "revoke", revoked, "--out", str(out), "--reason",
                            "laptop stolen", "--hub", federation.hub_url,
                            "--token", federation.admin_token, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "broker restarted" in result.stdout
        assert "object store: identity withdrawn" in result.stdout
        # Registry tokens and the object store refuse the revoked spoke at once.
        assert registry_token(revoked) == 401
        assert registry_token(kept) == 200
        # (its files, moved aside on the hub host, stand for the copy the site still holds)
        sites[revoked] = ObjectStore.from_file(out / "revoked" / revoked / "objectstore.json")
        with pytest.raises(ObjectStoreRefused):
            sites[revoked].get(global_model_key(1))
        with pytest.raises(ObjectStoreRefused):
            sites[revoked].put(round_update_key(revoked, 2), b"after revocation")
        assert sites[kept].get(global_model_key(1)) == b"global model 1"
        with federation.api() as api:
            row = api.get(f"/api/spokes/{revoked}").raise_for_status().json()
            assert row["revoked_at"]
            keys = api.get(f"/api/spokes/{revoked}/keys").raise_for_status().json()
            assert keys and all(k["revoked_at"] for k in keys)
            page = api.get("/spokes").raise_for_status().text
            assert "revoked" in page
            # A revoked site cannot come back with a new key under the same id.
            assert api.post(f"/api/spokes/{revoked}/keys",
                            json={"public_key_pem": keys[0]["public_key_pem"]}
                            ).status_code == 409

        # The broker no longer lets the revoked identity in; the kept spoke reconnects.
        identity = out / "revoked" / revoked
        assert identity.is_dir() and not (out / "identities" / revoked).exists()
        settings = bundle.identity(kept).broker_settings(bundle.host, bundle.stomp_ssl_port)
        refused = settings.model_copy(update={
            "user": revoked, "cert_file": identity / "client.crt",
            "key_file": identity / "client.key"})
        probe = StompClient(refused, f"probe-{revoked}").start()
        try:
            assert not probe.wait_connected(8), "the revoked spoke still reached the broker"
        finally:
            probe.close()
        before = rows[kept]["last_heartbeat_at"]

        def kept_beats_again() -> bool:
            with federation.api() as api:
                row = api.get(f"/api/spokes/{kept}").raise_for_status().json()
            return bool(row["online"] and row["last_heartbeat_at"] != before)

        _wait(kept_beats_again, 90, "the kept spoke back on the restarted broker")
        assert federation.processes["hub"].alive()
    finally:
        federation.stop()
        stop_broker(load_bundle(out))
        objectstore.stop(store)


def test_rotation_reissues_every_certificate_and_keeps_the_ca(tmp_path: Path) -> None:
    """`tributary pki rotate` gives every party a new certificate from the same CA (parties
    keep trusting it); `--new-ca` replaces the CA as well; issuing again changes nothing."""
    out = tmp_path / "pki"
    spoke = f"rot-{uuid.uuid4().hex[:6]}"
    federation_pki.issue(out, hub_names=["hub.example.org", "10.0.0.1"], spokes=[spoke],
                         broker_port=free_port())
    before = {(c.holder, c.purpose): c.serial for c in federation_pki.inventory(out)}
    federation_pki.issue(out)  # idempotent: nothing is re-issued
    assert {(c.holder, c.purpose): c.serial for c in federation_pki.inventory(out)} == before

    assert _tributary("pki", "rotate", "--out", str(out), "--no-objectstore").returncode == 0
    after = {(c.holder, c.purpose): c.serial for c in federation_pki.inventory(out)}
    ca = ("federation", "certificate authority")
    assert after[ca] == before[ca]
    assert all(after[k] != before[k] for k in before if k != ca)
    hub = x509.load_pem_x509_certificate((out / "hub" / "server.crt").read_bytes())
    names = hub.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "hub.example.org" in names.get_values_for_type(x509.DNSName)

    assert _tributary("pki", "rotate", "--out", str(out), "--new-ca",
                      "--no-objectstore").returncode == 0
    renewed = federation_pki.inventory(out)
    assert renewed[0].serial != after[ca]
    new_ca = x509.load_pem_x509_certificate((out / "pki" / "ca.crt").read_bytes())
    for cert in renewed[1:]:
        x509.load_pem_x509_certificate(cert.path.read_bytes()).verify_directly_issued_by(new_ca)
    # Each party's folder carries the new CA to hand out with its certificate.
    assert (out / "identities" / spoke / "ca.crt").read_bytes() == (
        out / "pki" / "ca.crt").read_bytes()
