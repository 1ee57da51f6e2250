"""One PKI for the whole federation: every TLS endpoint and every party's identity comes
from one federation CA, and one command issues, rotates, inspects and revokes them.

The broker's mutual TLS (:mod:`tributary.services.broker_security`) started this; the same
CA now also signs the hub's HTTPS certificate, the registry's and the object store's, so a
party needs exactly one trust anchor (``ca.crt``) for every hop. What each party holds:

    hub host      pki/ (the CA: keep it offline where you can), broker/, hub/server.*,
                  registry/server.*, registry-token/ (what signs the hub's registry
                  tokens; the registry trusts tokens chaining to ca.crt), hub/objectstore.json;
                  the object store's own folder (its certificates from this CA, every
                  party's S3 secret: :mod:`tributary.services.objectstore`)
    each spoke    identities/<spoke>/ (client.crt, client.key, ca.crt, and objectstore.json
                  when the federation has an object store)

``federation.json`` records the names the hub side answers to, the spokes and the revoked
ones, so that ``rotate`` and ``revoke`` re-create exactly what ``issue`` did. Revoking a spoke
withdraws its broker identity (the broker is restarted, which drops a connection it still
holds) and its object-store identity (live, no restart); the hub's part (keys, results,
registry tokens) is done by the caller, ``tributary pki revoke``, which does all of it
together.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field

from tributary.services import broker_network, broker_security, objectstore, pki
from tributary.services.settings import ServiceSettings
from tributary.services.system import ServiceError

FEDERATION_FILE = "federation.json"
#: Folders (under the federation folder) of the hub side's TLS endpoints.
SERVER_ENDPOINTS = ("hub", "registry")
#: The hub's registry-token signer (ES256 with an ``x5c`` chain to the federation CA).
TOKEN_SIGNER_DIR = "registry-token"
TOKEN_SIGNER_NAME = "tributary-hub-registry-tokens"


class FederationSpec(BaseModel):
    """``federation.json``: what was issued, to re-issue the same on rotation."""

    model_config = ConfigDict(extra="forbid")

    #: DNS names and addresses clients dial for the hub side (hub, broker, registry, object
    #: store); every server certificate carries all of them.
    hub_names: list[str] = Field(min_length=1)
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(broker_security.DEFAULT_STOMP_SSL_PORT, ge=1, le=65535)
    hub_identity: str = "hub"
    spokes: list[str] = Field(default_factory=list)
    revoked: dict[str, dt.datetime] = Field(default_factory=dict)

    @property
    def active_spokes(self) -> list[str]:
        return sorted(s for s in self.spokes if s not in self.revoked)


@dataclass(frozen=True)
class CertificateInfo:
    """One certificate of the federation and how long it has left."""

    holder: str
    purpose: str
    path: Path
    subject: str
    serial: str
    not_after: dt.datetime

    @property
    def days_left(self) -> int:
        return (self.not_after - dt.datetime.now(dt.UTC)) // dt.timedelta(days=1)

    @property
    def state(self) -> str:
        left = self.not_after - dt.datetime.now(dt.UTC)
        return ("expired" if left <= dt.timedelta(0)
                else "renew" if left < pki.RENEW_BEFORE else "ok")


def load_spec(out_dir: Path) -> FederationSpec | None:
    path = out_dir / FEDERATION_FILE
    if not path.exists():
        return None
    return FederationSpec.model_validate_json(path.read_text())


def _save_spec(out_dir: Path, spec: FederationSpec) -> None:
    (out_dir / FEDERATION_FILE).write_text(spec.model_dump_json(indent=2) + "\n")


def issue(out_dir: Path, hub_names: list[str] | None = None, spokes: list[str] | None = None,
          broker_host: str | None = None, broker_port: int | None = None,
          rotate: bool = False, new_ca: bool = False,
          store: ServiceSettings | None = None) -> FederationSpec:
    """Issue (or, idempotently, keep) every certificate of the federation in ``out_dir``.

    ``spokes`` are added to those already issued; a revoked spoke is refused (give the site a
    new id). ``rotate`` re-issues every certificate from the same CA; ``new_ca`` replaces the
    CA too (every party then needs the new ``ca.crt``). Certificates within
    :data:`pki.RENEW_BEFORE` of expiry are re-issued by any run. With ``store`` (the object
    store's service settings) the object store's certificates come from the same CA, every
    active spoke gets its own S3 identity (``identities/<spoke>/objectstore.json``) and the
    hub its own (``hub/objectstore.json``); a running store takes them at once.
    """
    out_dir = out_dir.resolve()
    spec = load_spec(out_dir)
    if spec is None:
        if not hub_names:
            raise ValueError("name the hub side's host names or addresses (--hub-name)")
        spec = FederationSpec(hub_names=list(dict.fromkeys(hub_names)))
    elif hub_names:
        spec.hub_names = list(dict.fromkeys(hub_names))
    if broker_host:
        spec.broker_host = broker_host
    if broker_port:
        spec.broker_port = broker_port
    refused = sorted(set(spokes or ()) & set(spec.revoked))
    if refused:
        raise ValueError(f"spoke(s) {', '.join(refused)} were revoked; enrol the site again "
                         "under a new id")
    spec.spokes = sorted(set(spec.spokes) | set(spokes or ()))

    broker_network.regenerate_brokers(
        out_dir, hub_identity=spec.hub_identity, spoke_ids=spec.active_spokes,
        host=spec.broker_host, stomp_ssl_port=spec.broker_port,
        server_names=spec.hub_names, rotate=rotate or new_ca, rotate_ca=new_ca)
    ca = pki.ensure_ca(out_dir / "pki")
    for endpoint in SERVER_ENDPOINTS:
        directory = out_dir / endpoint
        directory.mkdir(mode=0o700, exist_ok=True)
        pki.issue_server_cert(ca, directory, spec.hub_names, rotate=rotate or new_ca)
        shutil.copyfile(ca.cert_path, directory / "ca.crt")
    signer = out_dir / TOKEN_SIGNER_DIR
    signer.mkdir(mode=0o700, exist_ok=True)
    pki.issue_client_cert(ca, signer, TOKEN_SIGNER_NAME, rotate=rotate or new_ca)
    if store is not None:
        _issue_object_store(out_dir, spec, store, rotate or new_ca)
    _save_spec(out_dir, spec)
    return spec


def _issue_object_store(out_dir: Path, spec: FederationSpec, store: ServiceSettings,
                        rotate: bool) -> None:
    ca_dir = out_dir / "pki"
    if rotate:
        objectstore.rotate_certificates(store, ca_dir, spec.hub_names, rotate=True)
    else:
        objectstore.issue_certificates(store, ca_dir, spec.hub_names)
    objectstore.write_identities(store, spec.active_spokes)
    for party, folder in [(objectstore.HUB_PARTY, out_dir / "hub"),
                          *[(s, spoke_identity_dir(out_dir, s)) for s in spec.active_spokes]]:
        issued = objectstore.write_party_credentials(store, party, spec.hub_names[0], ca_dir)
        pki.write_private(folder / "objectstore.json", issued.read_bytes())


def revoke(out_dir: Path, spoke_id: str, store: ServiceSettings | None = None) -> bool:
    """Withdraw ``spoke_id``'s broker identity: the broker configuration is written without
    it and, if the broker runs from ``out_dir``, restarted so that an open connection of the
    spoke is dropped too (other parties reconnect by themselves). With ``store``, its object
    store identity goes as well (the running store refuses its key at once). Its identity
    folder is moved to ``revoked/``. Returns whether the broker was restarted."""
    out_dir = out_dir.resolve()
    spec = load_spec(out_dir)
    if spec is None:
        raise ServiceError(f"no federation PKI in {out_dir}; run `tributary pki issue` first")
    if spoke_id not in spec.spokes:
        raise ValueError(f"spoke {spoke_id!r} has no identity in {out_dir}")
    spec.revoked.setdefault(spoke_id, dt.datetime.now(dt.UTC))
    if store is not None:
        objectstore.revoke_spoke(store, spoke_id)
    broker_network.regenerate_brokers(
        out_dir, hub_identity=spec.hub_identity, spoke_ids=spec.active_spokes,
        host=spec.broker_host, stomp_ssl_port=spec.broker_port, server_names=spec.hub_names)
    identity = out_dir / "identities" / spoke_id
    if identity.exists():
        target = out_dir / "revoked" / spoke_id
        target.parent.mkdir(mode=0o700, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        identity.rename(target)
    _save_spec(out_dir, spec)
    bundle = broker_security.load_bundle(out_dir)
    if broker_security.stop_broker(bundle):
        broker_security.start_broker(bundle)
        return True
    return False


def _info(holder: str, purpose: str, path: Path) -> CertificateInfo:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return CertificateInfo(holder, purpose, path, str(cn[0].value) if cn else "",
                           format(cert.serial_number, "x"), cert.not_valid_after_utc)


def inventory(out_dir: Path, store: ServiceSettings | None = None) -> list[CertificateInfo]:
    """Every certificate of the federation with its expiry, CA first."""
    out_dir = out_dir.resolve()
    spec = load_spec(out_dir)
    if spec is None:
        raise ServiceError(f"no federation PKI in {out_dir}; run `tributary pki issue` first")
    found = [("federation", "certificate authority", out_dir / "pki" / "ca.crt"),
             ("broker", "broker TLS server", out_dir / "broker" / "server.crt")]
    found += [(endpoint, f"{endpoint} TLS server", out_dir / endpoint / "server.crt")
              for endpoint in SERVER_ENDPOINTS]
    found.append(("hub", "registry token signer", out_dir / TOKEN_SIGNER_DIR / "client.crt"))
    if store is not None:
        found.append(("objectstore", "objectstore TLS server",
                      objectstore.store_dir(store) / "tls" / "server.crt"))
    found += [(name, "client identity", out_dir / "identities" / name / "client.crt")
              for name in [spec.hub_identity, *spec.active_spokes]]
    return [_info(*entry) for entry in found if entry[2].exists()]


def spoke_identity_dir(out_dir: Path, spoke_id: str) -> Path:
    """The folder to hand to ``spoke_id``'s administrator (and nobody else)."""
    return out_dir.resolve() / "identities" / spoke_id

