"""The federation's object store against a real SeaweedFS over TLS, with boto3: each spoke
writes only its own round objects and reads only global models, the hub reads every round
and writes global models, nobody else gets in, and a revoked spoke is refused at once
while the store keeps running."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError, SSLError

from tributary.protocol.objects import (
    ObjectStore,
    ObjectStoreRefused,
    ObjectStoreTLSError,
    global_model_key,
    load_credentials,
    round_update_key,
    spoke_prefix,
)
from tributary.services import objectstore, pki
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port, port_open, read_pid

pytestmark = pytest.mark.e2e

A, B, C = "site-a", "site-b", "site-c"
FEDERATION = "objstore-test"
#: The store's "public" address: another loopback address, so that what listens only on
#: 127.0.0.1 (master, volume server, filer) can be told apart from what is published.
PUBLIC = "127.0.0.2"


@pytest.fixture(scope="module")
def settings() -> Iterator[ServiceSettings]:
    # A short state folder: the store's unix sockets live in it (see conftest's short_tmp).
    state = Path(tempfile.mkdtemp(prefix="trib-os-"))
    settings = ServiceSettings(state_dir=state, host=PUBLIC,
                               objectstore_port=free_port(PUBLIC))
    objectstore.write_identities(settings, [A, B], federation=FEDERATION)
    assert objectstore.ensure_running(settings) == "started"
    yield settings
    objectstore.stop(settings)
    shutil.rmtree(state, ignore_errors=True)


def store(settings: ServiceSettings, party: str) -> ObjectStore:
    return ObjectStore.from_file(objectstore.write_party_credentials(settings, party))


@pytest.fixture(scope="module")
def hub(settings: ServiceSettings) -> ObjectStore:
    return store(settings, "hub")


@pytest.fixture(scope="module")
def site_a(settings: ServiceSettings) -> ObjectStore:
    return store(settings, A)


@pytest.fixture(scope="module")
def site_b(settings: ServiceSettings) -> ObjectStore:
    return store(settings, B)


def test_start_is_idempotent_and_secrets_private(settings: ServiceSettings) -> None:
    assert objectstore.ensure_running(settings) == "running"
    running, detail = objectstore.describe(settings)
    assert running and detail == f"https://{PUBLIC}:{settings.objectstore_port}"
    folder = objectstore.store_dir(settings)
    credentials = objectstore.write_party_credentials(settings, A)
    for path in (folder / "identities.json", folder / "s3.json", folder / "security.toml",
                 credentials):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_spoke_writes_own_rounds_reads_only_global(hub: ObjectStore, site_a: ObjectStore,
                                                   site_b: ObjectStore) -> None:
    hub.put(global_model_key(1), b"global model 1")
    site_a.put(round_update_key(A, 1), b"update of a")
    site_b.put(round_update_key(B, 1), b"update of b")

    assert site_a.get(global_model_key(1)) == b"global model 1"
    assert site_a.list("global/") == [global_model_key(1)]
    assert site_a.list(spoke_prefix(A)) == [round_update_key(A, 1)]
    with pytest.raises(ObjectStoreRefused):
        site_a.put(round_update_key(B, 1), b"forged")
    with pytest.raises(ObjectStoreRefused):
        site_a.put(global_model_key(2), b"forged global")
    with pytest.raises(ObjectStoreRefused):
        site_a.put("elsewhere", b"outside every prefix")
    with pytest.raises(ObjectStoreRefused):
        site_a.get(round_update_key(B, 1))
    with pytest.raises(ObjectStoreRefused):
        site_a.list(spoke_prefix(B))
    with pytest.raises(ObjectStoreRefused):
        site_a.list("")
    with pytest.raises(ClientError):
        site_a.client.delete_object(Bucket=site_a.bucket, Key=global_model_key(1))
    with pytest.raises(ClientError):  # a copy is a read of the source
        site_a.client.copy_object(Bucket=site_a.bucket, Key=round_update_key(A, 9),
                                  CopySource={"Bucket": site_a.bucket,
                                              "Key": round_update_key(B, 1)})
    with pytest.raises(ClientError):
        site_a.client.create_bucket(Bucket="site-a-own-bucket")

    # The hub reads every spoke's round and writes the next global model.
    assert hub.get(round_update_key(A, 1)) == b"update of a"
    assert hub.get(round_update_key(B, 1)) == b"update of b"
    hub.put(global_model_key(2), b"global model 2")
    assert site_b.get(global_model_key(2)) == b"global model 2"
    assert hub.get(global_model_key(1)) == b"global model 1"  # the forgeries changed nothing


def test_anonymous_refused(settings: ServiceSettings, hub: ObjectStore) -> None:
    hub.put(global_model_key(3), b"not for strangers")
    creds, ca = load_credentials(objectstore.write_party_credentials(settings, "hub"))
    anonymous = boto3.client("s3", endpoint_url=creds.endpoint, region_name=creds.region,
                             verify=str(ca), config=Config(signature_version=UNSIGNED))
    for call in (lambda: anonymous.get_object(Bucket=creds.bucket, Key=global_model_key(3)),
                 lambda: anonymous.list_objects_v2(Bucket=creds.bucket),
                 lambda: anonymous.put_object(Bucket=creds.bucket, Key="anon", Body=b"x")):
        with pytest.raises(ClientError) as refused:
            call()
        assert refused.value.response["Error"]["Code"] == "AccessDenied"


def test_plain_http_refused(settings: ServiceSettings, hub: ObjectStore) -> None:
    hub.put(global_model_key(4), b"secret weights")
    url = f"http://{PUBLIC}:{settings.objectstore_port}/{FEDERATION}/{global_model_key(4)}"
    response = httpx.get(url, timeout=5)
    assert response.status_code == 400
    assert "HTTPS" in response.text and b"secret weights" not in response.content


def test_only_the_s3_gateway_is_published(settings: ServiceSettings) -> None:
    """Master, volume server and filer (unauthenticated HTTP) answer on loopback only; the
    S3 gateway's gRPC port on the public address wants a client certificate from our CA."""
    ports = json.loads((objectstore.store_dir(settings) / "ports.json").read_text())
    for name in ("master", "volume", "filer", "master_grpc", "volume_grpc", "filer_grpc"):
        assert port_open("127.0.0.1", ports[name]), name
        assert not port_open(PUBLIC, ports[name]), name
    ca = pki.ensure_ca(objectstore.default_ca_dir(settings))
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    with (socket.create_connection((PUBLIC, ports["s3_grpc"]), timeout=5) as raw,
          context.wrap_socket(raw, server_hostname=PUBLIC) as tls,
          pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED")):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\n")
        tls.recv(16)


def test_client_not_trusting_the_ca_fails_clearly(settings: ServiceSettings,
                                                  tmp_path: Path) -> None:
    creds, _ = load_credentials(objectstore.write_party_credentials(settings, A))
    other_ca = pki.ensure_ca(tmp_path / "other-ca")
    with pytest.raises(ObjectStoreTLSError, match="not signed by the federation CA"):
        ObjectStore(creds, other_ca.cert_path).get(global_model_key(1))
    system_trust = boto3.client(
        "s3", endpoint_url=creds.endpoint, region_name=creds.region,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key.get_secret_value())
    with pytest.raises(SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        system_trust.list_objects_v2(Bucket=creds.bucket, Prefix="global/")


def test_enrol_and_revoke_without_restart(settings: ServiceSettings, hub: ObjectStore,
                                          site_a: ObjectStore, site_b: ObjectStore) -> None:
    pid = read_pid(objectstore.store_dir(settings) / "weed.pid")
    hub.put(global_model_key(5), b"model 5")
    before = objectstore.load_identities(settings)
    assert before is not None

    objectstore.write_identities(settings, [A, B, C], federation=FEDERATION)
    after = objectstore.load_identities(settings)
    assert after is not None and after.spokes[A] == before.spokes[A]  # secrets reused
    site_c = store(settings, C)
    site_c.put(round_update_key(C, 5), b"update of c")
    assert site_c.get(global_model_key(5)) == b"model 5"

    assert objectstore.revoke_spoke(settings, A)
    with pytest.raises(ObjectStoreRefused):
        site_a.get(global_model_key(5))
    with pytest.raises(ObjectStoreRefused):
        site_a.put(round_update_key(A, 5), b"after revocation")
    assert site_b.get(global_model_key(5)) == b"model 5"
    site_b.put(round_update_key(B, 5), b"update of b")
    assert hub.get(round_update_key(B, 5)) == b"update of b"
    assert read_pid(objectstore.store_dir(settings) / "weed.pid") == pid  # never restarted
    with pytest.raises(Exception, match="no object store identity"):
        objectstore.write_party_credentials(settings, A)

    # Enrolled again, the spoke gets a new secret; the old one stays refused.
    objectstore.write_identities(settings, [A, B, C], federation=FEDERATION)
    renewed = store(settings, A)
    assert renewed.creds.access_key != site_a.creds.access_key
    assert renewed.get(global_model_key(5)) == b"model 5"
    with pytest.raises(ObjectStoreRefused):
        site_a.get(global_model_key(5))
