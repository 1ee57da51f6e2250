"""Per-party registry access against the real pieces: Debian's registry in token mode on
loopback, the registry gateway process (TLS, digest restrictions) on the published port, the
hub process issuing tokens, and the Docker engine pulling with a spoke's credentials.

Developers push only under their own name and pull others' images only by approved digest;
a spoke pulls only the approved digests of studies that target it and never pushes; a
revoked spoke, anonymous callers, plain HTTP and clients not trusting the CA are refused."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import docker
import docker.errors
import httpx
import pytest
from sqlmodel import Session

from tributary.hub.db import make_engine
from tributary.hub.models import Spoke
from tributary.protocol.messages import AlgorithmRef
from tributary.protocol.registry import RegistryClient, RegistryError
from tributary.protocol.release import APPROVAL_PREDICATE_TYPE
from tributary.protocol.signing import SigningKey
from tributary.services import registry as registry_service
from tributary.services.pki import ensure_ca, issue_client_cert, issue_server_cert
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.spoke.images import ImageRefused, RegistryAccess, ensure_image
from tributary.testbed.federation import LocalFederation
from tributary_algorithm.tools import ToolError
from tributary_algorithm.tools import push_image as sdk_push

pytestmark = pytest.mark.e2e
SERVICE = "tributary-registry"
#: The registry (no token for it, 401) or the gateway (not among the token's digests, 403).
DENIED = r"40[13]"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_image(client: RegistryClient, name: str, stamp: str, tag: str = "v1") -> str:
    """A tiny valid image (one layer, one file) pushed as ``name:tag``; its digest."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = stamp.encode()
        info = tarfile.TarInfo("stamp.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [_sha(raw.getvalue())]}}
                        ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(config), "digest": client.put_blob(name, config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": len(layer), "digest": client.put_blob(name, layer)}],
    }
    return client.put_manifest(name, tag, manifest)


@dataclass
class Setup:
    fed: LocalFederation
    registry: str
    ca_file: Path
    passwords: dict[str, str]
    spoke_keys: dict[str, SigningKey]
    approved: str  # alice/algo, approved, used by an experiment targeting s1
    approved_elsewhere: str  # alice/other, approved, no study targets s1
    unapproved: str  # alice/algo, pushed, never registered

    def user(self, name: str, **kwargs: object) -> RegistryClient:
        return RegistryClient(self.registry, username=name, password=self.passwords[name],
                              ca_file=self.ca_file, **kwargs)  # type: ignore[arg-type]

    def spoke(self, spoke_id: str) -> RegistryAccess:
        return RegistryAccess(spoke_id, self.spoke_keys[spoke_id], SERVICE, self.ca_file)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("registry-access")
    ca = ensure_ca(root / "pki", common_name="Tributary federation CA")
    server = issue_server_cert(ca, root / "pki" / "registry", ["127.0.0.1"])
    signer = issue_client_cert(ca, root / "pki" / "token", "tributary-hub-registry-tokens")
    gateway_port = free_port()
    settings = ServiceSettings(state_dir=root / "state", registry_port=gateway_port,
                               registry_internal_port=free_port())
    registry = f"127.0.0.1:{gateway_port}"
    auth = registry_service.TokenAuth(realm=f"https://{registry}/token",
                                      rootcertbundle=ca.cert_path, service=SERVICE)
    fed = LocalFederation(root=root / "fed", hub_env={
        "TRIBUTARY_HUB_REGISTRY_TOKEN_KEY": str(signer.key_path),
        "TRIBUTARY_HUB_REGISTRY_TOKEN_CERT": str(signer.cert_path),
        "TRIBUTARY_HUB_REGISTRY_TOKEN_SERVICE": SERVICE,
        "TRIBUTARY_HUB_REGISTRY_CA_FILE": str(ca.cert_path),
    })
    try:
        registry_service.ensure_running(settings, auth)
        registry_service.ensure_gateway(settings, registry_service.GatewayOptions(
            server.cert_path, server.key_path, auth, hub_url=f"http://127.0.0.1:{fed.hub_port}"))
        fed.start_hub()
        passwords = {name: secrets.token_urlsafe(18) for name in ("alice", "bob")}
        with fed.api() as api:
            for name, password in passwords.items():
                api.post("/api/users", json={"username": name, "password": password,
                                             "roles": ["developer"]}).raise_for_status()
        spoke_keys = {}
        for spoke_id in ("s1", "s2"):
            data = root / "data" / spoke_id
            data.mkdir(parents=True)
            config = fed.add_spoke(spoke_id, data)
            spoke_keys[spoke_id] = SigningKey.load(config.parent / "spoke.key")
        base = Setup(fed, registry, ca.cert_path, passwords, spoke_keys, "", "", "")
        with base.user("alice") as alice:
            approved = push_image(alice, "alice/algo", "approved")
            unapproved = push_image(alice, "alice/algo", "unapproved", tag="v2")
            elsewhere = push_image(alice, "alice/other", "elsewhere")
        algorithm = fed.register_algorithm(name="algo", version="1",
                                           repository=f"{registry}/alice/algo", digest=approved)
        fed.register_algorithm(name="other", version="1",
                               repository=f"{registry}/alice/other", digest=elsewhere)
        with fed.api() as api:
            study = api.post("/api/experiments", json={
                "name": "study", "algorithm_id": algorithm["id"], "spoke_ids": ["s1"],
            }).raise_for_status().json()
            api.post(f"/api/experiments/{study['id']}/launch").raise_for_status()
            # A draft that targets s2 grants it nothing until it is launched.
            api.post("/api/experiments", json={
                "name": "draft", "algorithm_id": algorithm["id"], "spoke_ids": ["s2"],
            }).raise_for_status()
        yield Setup(fed, registry, ca.cert_path, passwords, spoke_keys, approved, elsewhere,
                    unapproved)
    finally:
        fed.stop()
        registry_service.stop(settings)
        for base_dir in (registry_service.DOCKER_CERTS_DIR, registry_service.PODMAN_CERTS_DIR):
            shutil.rmtree(base_dir / registry, ignore_errors=True)


def test_developer_pushes_only_under_own_name(setup: Setup) -> None:
    with setup.user("bob") as bob:
        push_image(bob, "bob/tool", "bob's own")
        with pytest.raises(RegistryError):
            push_image(bob, "alice/algo", "overwrite attempt", tag="v1")
    with setup.user("alice") as alice:  # alice's tag still names her image
        assert alice.manifest_digest("alice/algo", "v1") == setup.approved


def test_developer_pulls_others_only_by_approved_digest(setup: Setup) -> None:
    with setup.user("bob") as bob:
        manifest = bob.get_manifest("alice/algo", setup.approved)
        assert manifest is not None
        bob.get_blob("alice/algo", manifest["config"]["digest"])
        with pytest.raises(RegistryError, match=DENIED):
            bob.get_manifest("alice/algo", setup.unapproved)
        with pytest.raises(RegistryError, match=DENIED):
            bob.get_manifest("alice/algo", "v1")  # a tag could point anywhere
    # `tributary algorithm verify` with the CA and credentials from the environment
    env = {**os.environ, "TRIBUTARY_REGISTRY_CA_FILE": str(setup.ca_file),
           "TRIBUTARY_REGISTRY_USERNAME": "bob",
           "TRIBUTARY_REGISTRY_PASSWORD": setup.passwords["bob"]}
    checked = subprocess.run(
        [sys.executable, "-m", "tributary.cli", "algorithm", "verify",
         f"{setup.registry}/alice/algo@{setup.approved}",
         "--key", f"{setup.fed.hub_key_path}.pub"],
        env=env, capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "approval" in checked.stdout


def test_cross_repository_mount_obeys_the_digest_restriction(setup: Setup) -> None:
    """Mounting a blob of alice/algo into bob's repository reads alice/algo: only blobs of
    approved digests may be mounted."""
    with setup.user("alice") as alice:
        unapproved = alice.get_manifest("alice/algo", setup.unapproved)
        approved = alice.get_manifest("alice/algo", setup.approved)
    assert unapproved is not None and approved is not None
    trust = ssl.create_default_context(cafile=str(setup.ca_file))
    url = f"https://{setup.registry}"
    answer = httpx.get(f"{url}/token", verify=trust, auth=("bob", setup.passwords["bob"]),
                       params=[("service", SERVICE),
                               ("scope", "repository:bob/mounted:pull,push"),
                               ("scope", "repository:alice/algo:pull")])
    bearer = {"Authorization": f"Bearer {answer.raise_for_status().json()['token']}"}
    for manifest, expected in ((unapproved, 403), (approved, 201)):
        mounted = httpx.post(f"{url}/v2/bob/mounted/blobs/uploads/", headers=bearer,
                             verify=trust, params={"mount": manifest["layers"][0]["digest"],
                                                   "from": "alice/algo"})
        assert mounted.status_code == expected, mounted.text


def test_spoke_pulls_only_digests_of_studies_targeting_it(setup: Setup) -> None:
    registry = setup.registry
    with setup.spoke("s1").client(registry) as s1:
        assert s1.manifest_digest("alice/algo", setup.approved) == setup.approved
        # the hub's approval statement beside the image is readable too
        assert APPROVAL_PREDICATE_TYPE in {
            a.predicate_type for a in s1.attestations("alice/algo", setup.approved)}
        with pytest.raises(RegistryError, match=DENIED):
            s1.get_manifest("alice/algo", setup.unapproved)
        with pytest.raises(RegistryError, match=DENIED):
            s1.get_manifest("alice/other", setup.approved_elsewhere)
        with pytest.raises(RegistryError):
            push_image(s1, "alice/algo", "spoke push", tag="v1")
    with setup.spoke("s2").client(registry) as s2, pytest.raises(RegistryError, match=DENIED):
        s2.get_manifest("alice/algo", setup.approved)


def test_docker_engine_pulls_with_spoke_credentials(setup: Setup) -> None:
    """The spoke's own pull (images.ensure_image) through the Docker engine, which gets
    its token from the gateway's realm with the spoke's assertion as password."""
    registry_service.trust_ca(setup.registry, setup.ca_file)
    client = docker.from_env(timeout=60)
    ref = AlgorithmRef(name="algo", version="1", repository=f"{setup.registry}/alice/algo",
                       digest=setup.approved)
    try:
        with pytest.raises(ImageRefused, match="registry does not serve"):
            ensure_image(client, ref, [setup.registry], access=setup.spoke("s2"))
        image_id = ensure_image(client, ref, [setup.registry], access=setup.spoke("s1"))
        assert ref.reference in client.images.get(image_id).attrs["RepoDigests"]
    finally:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(ref.reference, force=True)
        client.close()


def test_sdk_push_logs_in_with_hub_credentials(setup: Setup) -> None:
    """``tributary-algorithm push --username``: the Docker engine logs in with a hub
    username and password and pushes under that user's name only."""
    registry_service.trust_ca(setup.registry, setup.ca_file)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("sdk.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"sdk"))
    local = f"tributary-test/registry-access:{secrets.token_hex(4)}"
    subprocess.run(["docker", "import", "-", local], input=raw.getvalue(), check=True,
                   capture_output=True)
    pushed = [f"{setup.registry}/alice/sdk:1", f"{setup.registry}/bob/sdk:1"]
    try:
        repo, digest = sdk_push(local, pushed[0], username="alice",
                                password=setup.passwords["alice"])
        assert repo == f"{setup.registry}/alice/sdk" and digest.startswith("sha256:")
        with pytest.raises(ToolError, match=r"denied|unauthorized|authentication required"):
            sdk_push(local, pushed[0], username="bob", password=setup.passwords["bob"])
        with pytest.raises(ToolError, match="login"):
            sdk_push(local, pushed[1], username="bob", password="not bob's password")
    finally:
        subprocess.run(["docker", "rmi", local, *pushed], capture_output=True, check=False)


def test_refusals(setup: Setup, tmp_path: Path) -> None:
    url = f"https://{setup.registry}"
    trust = ssl.create_default_context(cafile=str(setup.ca_file))
    # anonymous: the registry challenges, the token service refuses
    answer = httpx.get(f"{url}/v2/alice/algo/manifests/{setup.approved}",
                       verify=trust)
    assert answer.status_code == 401
    assert httpx.get(f"{url}/token", params={"service": SERVICE}, verify=trust
                     ).status_code == 401
    with RegistryClient(setup.registry, ca_file=setup.ca_file) as anonymous, \
            pytest.raises(RegistryError, match="401"):
        anonymous.get_manifest("alice/algo", setup.approved)
    # plain HTTP to the TLS port
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{setup.registry}/v2/", timeout=5)
    # a client trusting another CA
    other = ensure_ca(tmp_path / "other-ca")
    with RegistryClient(setup.registry, ca_file=other.cert_path) as stranger, \
            pytest.raises(RegistryError, match="not trusted"):
        stranger.get_manifest("alice/algo", setup.approved)
    # a forged assertion (a key the hub never enrolled) and a revoked spoke
    forged = RegistryAccess("s1", SigningKey.generate(), SERVICE, setup.ca_file)
    with forged.client(setup.registry) as client, pytest.raises(RegistryError, match="401"):
        client.get_manifest("alice/algo", setup.approved)
    engine = make_engine(f"sqlite:///{setup.fed.root / 'hub.db'}", migrate=False)
    with Session(engine) as session:
        spoke = session.get(Spoke, "s1")
        assert spoke is not None
        spoke.revoked_at = datetime.now(UTC)
        session.add(spoke)
        session.commit()
    engine.dispose()
    with setup.spoke("s1").client(setup.registry) as s1, \
            pytest.raises(RegistryError, match="401"):
        s1.get_manifest("alice/algo", setup.approved)
    # a spoke no launched study targets (its refusal is made here, not left to another test)
    with setup.spoke("s2").client(setup.registry) as s2, \
            pytest.raises(RegistryError, match=DENIED):
        s2.get_manifest("alice/algo", setup.approved)
    # a developer asking to push into another's repository gets a token without it
    assert httpx.get(f"{url}/token", verify=trust, auth=("bob", setup.passwords["bob"]),
                     params={"service": SERVICE, "scope": "repository:alice/algo:push"}
                     ).status_code == 200
    # every refusal is in the hub's audit trail
    with setup.fed.api() as api:
        refused = api.get("/api/audit", params={"action": "registry.token_refused"}
                          ).raise_for_status().json()
        denied = api.get("/api/audit", params={"action": "registry.access_refused"}
                         ).raise_for_status().json()
    reasons = {(event["target"], event["detail"]["reason"]) for event in refused}
    assert ("s1", "spoke s1 is revoked") in reasons and ("anonymous", "anonymous") in reasons
    assert ("s1", "assertion not signed by an active key of spoke s1") in reasons  # forged
    assert {event["target"] for event in denied} >= {"bob", "s2"}
