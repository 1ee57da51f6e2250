"""ActiveMQ configuration for a federation that does not trust its network.

The broker listens only on ``stomp+ssl`` and demands a client certificate from our CA, so
nothing without an issued identity can even open a STOMP session. The certificate *is* the
identity: JAAS certificate login maps its subject (``CN=<identity>``) to the user and its
groups, whatever user name a client sends, and the authorization map confines it: a spoke
reads only its own queue and writes only the results queue; only the hub writes to spoke
queues and reads results and dead letters. A compromised spoke therefore cannot
see other sites' experiments, impersonate the hub towards them, or read other sites' results.

Layout of the output folder (keep it private; it holds the CA key and every secret)::

    activemq.xml            broker config with the key store password (0600)
    jaas/                   certificate login: subject -> identity, identity -> groups
    broker.json             host, port and identities, to start the broker again (no secrets)
    pki/ca.crt, ca.key      the CA
    broker/                 server certificate, key store, trust store, store password
    identities/<id>/        client.crt, client.key, ca.crt: hand to that party only
    instance/               the running broker's data, logs and pid (when started from here)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from tributary.protocol.broker import BrokerSettings
from tributary.protocol.cohorts.vertical import hub_vertical_queue, spoke_vertical_queue
from tributary.protocol.destinations import (
    DEFAULT_FEDERATION,
    dead_letter_queue,
    results_queue,
    spoke_queue,
    validate_federation,
)
from tributary.protocol.messages import SPOKE_ID_RE
from tributary.protocol.training.transport import hub_training_queue, spoke_training_queue
from tributary.services import broker, pki
from tributary.services.system import ServiceError, port_open, read_pid

log = logging.getLogger(__name__)

DEFAULT_STOMP_SSL_PORT = 61614
#: Authorization groups. Every identity is in ALL; each spoke also in its own group.
HUB_GROUP = "tributary.hub"
SPOKES_GROUP = "tributary.spokes"
ALL_GROUP = "tributary.users"


def _spoke_group(spoke_id: str) -> str:
    return f"tributary.spoke.{spoke_id}"


#: Public names for :mod:`tributary.services.broker_network`, which writes edge brokers.
def spoke_group(spoke_id: str) -> str:
    return _spoke_group(spoke_id)


def bridge_group(bridge: str) -> str:
    """The group of a network bridge's identity (an edge broker's certificate)."""
    return f"tributary.bridge.{bridge}"


@dataclass(frozen=True)
class Identity:
    """One party's credentials folder, as handed to it."""

    name: str
    directory: Path

    @property
    def cert_file(self) -> Path:
        return self.directory / "client.crt"

    @property
    def key_file(self) -> Path:
        return self.directory / "client.key"

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def broker_settings(self, host: str, port: int,
                        federation: str = DEFAULT_FEDERATION) -> BrokerSettings:
        """Connection settings for :class:`~tributary.protocol.broker.StompClient`."""
        return BrokerSettings(host=host, port=port, user=self.name, ca_file=self.ca_file,
                              cert_file=self.cert_file, key_file=self.key_file,
                              federation=federation)


@dataclass(frozen=True)
class BrokerSecurityBundle:
    """What :func:`generate_broker_config` wrote; holds paths only, never secrets."""

    out_dir: Path
    config_path: Path
    host: str
    stomp_ssl_port: int
    ca_file: Path
    hub: Identity
    spokes: dict[str, Identity] = field(default_factory=dict)
    #: The queue namespace the broker's authorization map opens (the hub's
    #: ``broker_federation``, the spokes' ``[broker] federation``).
    federation: str = DEFAULT_FEDERATION

    @property
    def url(self) -> str:
        return f"stomp+ssl://{self.host}:{self.stomp_ssl_port}"

    @property
    def instance_dir(self) -> Path:
        return self.out_dir / "instance"

    def identity(self, name: str) -> Identity:
        if name == self.hub.name:
            return self.hub
        try:
            return self.spokes[name]
        except KeyError:
            raise KeyError(f"no broker identity {name!r} in {self.out_dir}") from None

    def broker_settings(self, name: str) -> BrokerSettings:
        return self.identity(name).broker_settings(self.host, self.stomp_ssl_port,
                                                   self.federation)


def _validate_identity(name: str) -> str:
    if not SPOKE_ID_RE.fullmatch(name):
        raise ValueError(f"identity {name!r} must be 2-63 lower-case letters, digits or '-'")
    return name


def _queue(destination: str) -> str:
    return destination.removeprefix("/queue/")


def _entry(queue: str, read: list[str], write: list[str], admin: list[str]) -> str:
    return (f"<authorizationEntry queue={quoteattr(queue)} read={quoteattr(','.join(read))} "
            f"write={quoteattr(','.join(write))} admin={quoteattr(','.join(admin))}/>")


def hub_queues(federation: str) -> list[str]:
    """The hub's queues of ``federation`` that every spoke writes: results, federated and
    vertical training (the bridges carry them too)."""
    return [results_queue(validate_federation(federation)), hub_training_queue(federation),
            hub_vertical_queue(federation)]


def spoke_queues(spoke_id: str, federation: str) -> list[str]:
    """The queues only the hub writes to ``spoke_id``: studies, training, vertical."""
    return [spoke_queue(spoke_id, federation), spoke_training_queue(spoke_id, federation),
            spoke_vertical_queue(spoke_id, federation)]


def authorization_entries(spoke_ids: list[str],
                          bridges: Mapping[str, Sequence[str]] | None = None,
                          federation: str = DEFAULT_FEDERATION) -> list[str]:
    """The authorization map. Each destination is listed with its complete ACLs, so the
    result is the same whether ActiveMQ unions the wildcard entry ``DLQ.>`` with a specific
    one or prefers the specific one. Destinations not listed are closed to every client.

    Consumers get ``write`` (and ``admin``) on the queue they read and on its dead-letter
    queue: without them ActiveMQ silently drops a NACKed message instead of dead-lettering it.

    ``bridges`` maps a network bridge's identity to the spokes whose queues it carries: it
    may read, write and create exactly the hub's queues (results, training, vertical),
    those spokes' queues (studies, training, vertical) and their dead-letter queues (a
    bridge consumes on one broker and produces on the other).

    Only ``federation``'s queues are listed: another federation's hub and spokes need a
    broker configuration of their own.
    """
    bridges = bridges or {}
    all_bridges = [bridge_group(b) for b in sorted(bridges)]
    entries = [_entry("DLQ.>", [HUB_GROUP], [HUB_GROUP], [HUB_GROUP])]
    # Results, federated and vertical training: each a queue of the hub's that every spoke
    # writes, beside one queue per spoke that only the hub writes; bridges carry both.
    for hub_side in hub_queues(federation):
        entries += [
            _entry(_queue(hub_side), [HUB_GROUP, *all_bridges],
                   [HUB_GROUP, SPOKES_GROUP, *all_bridges],
                   [HUB_GROUP, SPOKES_GROUP, *all_bridges]),
            _entry(_queue(dead_letter_queue(hub_side)), [HUB_GROUP, *all_bridges],
                   [HUB_GROUP, *all_bridges], [HUB_GROUP, *all_bridges]),
        ]
    for spoke_id in spoke_ids:
        own = _spoke_group(spoke_id)
        carriers = [bridge_group(b) for b in sorted(bridges) if spoke_id in bridges[b]]
        for side in spoke_queues(spoke_id, federation):
            entries += [
                _entry(_queue(side), [own, *carriers], [HUB_GROUP, own, *carriers],
                       [HUB_GROUP, own, *carriers]),
                _entry(_queue(dead_letter_queue(side)), [HUB_GROUP, *carriers],
                       [HUB_GROUP, own, *carriers], [HUB_GROUP, own, *carriers]),
            ]
    # Connections, consumers and producers publish advisories in the client's name.
    entries.append(
        f'<authorizationEntry topic="ActiveMQ.Advisory.>" read="{ALL_GROUP}" '
        f'write="{ALL_GROUP}" admin="{ALL_GROUP}"/>'
    )
    return entries


JAAS_REALM = "TributaryCertificateLogin"


def write_jaas(out_dir: Path, users: list[tuple[str, list[str]]]) -> Path:
    """JAAS certificate login files: each identity *is* its client certificate's subject
    (``CN=<identity>``), so a party cannot act as another by sending its user name; the
    groups file gives each identity its authorization groups. Returns login.config."""
    jaas = out_dir / "jaas"
    jaas.mkdir(mode=0o700, exist_ok=True)
    (jaas / "users.properties").write_text(
        "".join(f"{name}=CN={name}\n" for name, _ in users))
    groups: dict[str, list[str]] = {}
    for name, member_of in users:
        for group in member_of:
            groups.setdefault(group, []).append(name)
    (jaas / "groups.properties").write_text(
        "".join(f"{group}={','.join(names)}\n" for group, names in sorted(groups.items())))
    login = jaas / "login.config"
    login.write_text(
        f"{JAAS_REALM} {{\n"
        "    org.apache.activemq.jaas.TextFileCertificateLoginModule required\n"
        '        org.apache.activemq.jaas.textfiledn.user="users.properties"\n'
        '        org.apache.activemq.jaas.textfiledn.group="groups.properties";\n'
        "};\n")
    return login


def _security_xml(spoke_ids: list[str], keystore: Path, truststore: Path,
                  store_password: str,
                  bridges: Mapping[str, Sequence[str]] | None = None,
                  federation: str = DEFAULT_FEDERATION) -> str:
    entry_lines = "\n".join(f"              {e}" for e in
                            authorization_entries(spoke_ids, bridges, federation))
    pw = quoteattr(store_password)
    return f"""    <plugins>
      <jaasCertificateAuthenticationPlugin configuration="{JAAS_REALM}"/>
      <authorizationPlugin>
        <map>
          <authorizationMap>
            <authorizationEntries>
{entry_lines}
            </authorizationEntries>
          </authorizationMap>
        </map>
      </authorizationPlugin>
    </plugins>
    <sslContext>
      <sslContext keyStore={quoteattr(keystore.as_uri())} keyStorePassword={pw}
                  keyStoreType="PKCS12" trustStore={quoteattr(truststore.as_uri())}
                  trustStorePassword={pw} trustStoreType="PKCS12"/>
    </sslContext>
"""


_HEADER = re.compile(r"\A<!--.*?-->\s*", re.S)
_CONNECTORS = re.compile(r"<transportConnectors>.*?</transportConnectors>", re.S)


def security_xml(spoke_ids: list[str], keystore: Path, truststore: Path, store_password: str,
                 bridges: Mapping[str, Sequence[str]] | None = None,
                 federation: str = DEFAULT_FEDERATION) -> str:
    """The ``<plugins>`` (certificate login, authorization map) and ``<sslContext>``."""
    return _security_xml(spoke_ids, keystore, truststore, store_password, bridges,
                         federation)


def render_config(host: str, port: int, security_xml: str, bridge_port: int | None = None,
                  network_xml: str = "") -> str:
    """The plain broker template (same persistence, limits and dead-letter policy) with its
    connector replaced by mutual-TLS STOMP and the security elements added.

    ``bridge_port``: also accept network bridges from edge brokers there (OpenWire over
    mutual TLS, the only transport ActiveMQ bridges speak). ``network_xml``: this broker's
    own ``<networkConnectors>`` (an edge broker's bridge to the hub broker)."""
    template = resources.files("tributary.services").joinpath("activemq.xml").read_text()
    if not (_HEADER.search(template) and _CONNECTORS.search(template)
            and "  </broker>" in template):
        raise ServiceError("activemq.xml template changed shape; update broker_security.py")
    uri = (f"stomp+ssl://{host}:{port}?transport.needClientAuth=true"
           "&transport.maxFrameSize=4194304&transport.hbGracePeriodMultiplier=2")
    bridge = ""
    if bridge_port is not None:
        bridge_uri = f"ssl://{host}:{bridge_port}?transport.needClientAuth=true"
        # auditNetworkProducers: a message a bridge forwards again after a lost
        # acknowledgement is recognised by its id and not stored twice.
        bridge = (f'\n      <transportConnector name="bridges" uri={quoteattr(bridge_uri)} '
                  'auditNetworkProducers="true"/>')
    connector = (f'<transportConnectors>\n      <transportConnector name="stomp+ssl" '
                 f"uri={quoteattr(uri)}/>{bridge}\n    </transportConnectors>")
    header = ("<!-- ActiveMQ Classic broker for Tributary with mutual TLS and per-identity\n"
              "     authorization, written by `tributary broker config`. Contains secrets. -->\n")
    xml = _CONNECTORS.sub(lambda _: connector, _HEADER.sub("", template, count=1), count=1)
    if network_xml:
        if "    <persistenceAdapter>" not in xml:
            raise ServiceError("activemq.xml template changed shape; update broker_security.py")
        xml = xml.replace("    <persistenceAdapter>", network_xml + "    <persistenceAdapter>", 1)
    return header + xml.replace("  </broker>", security_xml + "  </broker>", 1)


def _prepare_identity(ca: pki.CertificateAuthority, directory: Path, name: str,
                      rotate: bool) -> Identity:
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    pki.issue_client_cert(ca, directory, name, rotate=rotate)
    shutil.copyfile(ca.cert_path, directory / "ca.crt")
    (directory / "password").unlink(missing_ok=True)  # written by earlier versions
    return Identity(name, directory)


def generate_broker_config(out_dir: Path, hub_identity: str = "hub",
                           spoke_ids: list[str] | tuple[str, ...] = (),
                           host: str = "127.0.0.1",
                           stomp_ssl_port: int = DEFAULT_STOMP_SSL_PORT,
                           server_names: list[str] | tuple[str, ...] = (),
                           rotate: bool = False,
                           rotate_ca: bool | None = None,
                           bridges: Mapping[str, Sequence[str]] | None = None,
                           bridge_port: int | None = None,
                           federation: str | None = None) -> BrokerSecurityBundle:
    """Write a mutual-TLS, per-identity ActiveMQ configuration into ``out_dir``.

    Idempotent: the CA, certificates and passwords already in ``out_dir`` are reused, so
    regenerating after a spoke joins does not disturb the others; ``rotate=True`` replaces
    all of them (``rotate_ca=False`` keeps the CA and re-issues every certificate it signed).
    ``server_names`` are extra DNS names or addresses for the broker's
    certificate besides ``host``, ``127.0.0.1`` and ``localhost``. ``bridges`` and
    ``bridge_port``: edge brokers' bridge identities and the spokes each carries, and the
    port they connect to (:mod:`tributary.services.broker_network` writes the edges).
    ``federation``: the queue namespace to open (the hub's ``broker_federation``); by
    default the one ``out_dir`` was written for, else ``tributary``, so regenerating after a
    spoke joins keeps it.
    """
    hub_identity = _validate_identity(hub_identity)
    federation = validate_federation(
        federation or (_recorded(out_dir) or {}).get("federation", DEFAULT_FEDERATION))
    spokes = sorted({_validate_identity(s) for s in spoke_ids})
    if hub_identity in spokes:
        raise ValueError(f"spoke id {hub_identity!r} is also the hub's identity")
    out_dir = out_dir.resolve()
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing folder keeps its mode
    for sub in ("pki", "broker", "identities"):
        (out_dir / sub).mkdir(exist_ok=True)
        (out_dir / sub).chmod(0o700)

    ca = pki.ensure_ca(out_dir / "pki", rotate=rotate if rotate_ca is None else rotate_ca)
    rotate = rotate or ca.created
    broker_dir = out_dir / "broker"
    server = pki.issue_server_cert(ca, broker_dir, [host, *server_names], rotate=rotate)
    store_password_file = broker_dir / "store.password"
    renew_stores = rotate or server.created or not store_password_file.exists()
    store_password = pki.read_or_create_secret(store_password_file, rotate=renew_stores)
    keystore, truststore = broker_dir / "broker.p12", broker_dir / "truststore.p12"
    if renew_stores or not keystore.exists():
        pki.write_keystore(keystore, server, ca, store_password)
    if renew_stores or not truststore.exists():
        pki.write_truststore(truststore, ca, store_password)

    identities_dir = out_dir / "identities"
    hub = _prepare_identity(ca, identities_dir / hub_identity, hub_identity,
                                          rotate)
    users = [(hub_identity, [HUB_GROUP, ALL_GROUP])]
    spoke_identities: dict[str, Identity] = {}
    for spoke_id in spokes:
        identity = _prepare_identity(ca, identities_dir / spoke_id, spoke_id, rotate)
        spoke_identities[spoke_id] = identity
        users.append((spoke_id, [_spoke_group(spoke_id), SPOKES_GROUP, ALL_GROUP]))
    bridges = {_validate_identity(b): sorted(carried) for b, carried in (bridges or {}).items()}
    users += [(b, [bridge_group(b), ALL_GROUP]) for b in sorted(bridges)]

    config_path = out_dir / "activemq.xml"
    xml = render_config(host, stomp_ssl_port,
                        _security_xml(spokes, keystore, truststore, store_password, bridges,
                                      federation),
                        bridge_port=bridge_port if bridges else None)
    pki.write_private(config_path, xml.encode())
    write_jaas(out_dir, users)
    (out_dir / "broker.json").write_text(json.dumps(
        {"host": host, "stomp_ssl_port": stomp_ssl_port, "hub_identity": hub_identity,
         "spoke_ids": spokes, "federation": federation}, indent=2) + "\n")
    log.info("wrote broker config for the hub and %d spoke(s) to %s", len(spokes), out_dir)
    return BrokerSecurityBundle(out_dir, config_path, host, stomp_ssl_port, ca.cert_path, hub,
                                spoke_identities, federation)


def load_bundle(out_dir: Path) -> BrokerSecurityBundle:
    """The bundle a previous :func:`generate_broker_config` wrote into ``out_dir``."""
    out_dir = out_dir.resolve()
    meta = _recorded(out_dir)
    if meta is None:
        raise ServiceError(f"no broker configuration in {out_dir}; "
                           "run `tributary broker config` first")
    identities = out_dir / "identities"
    return BrokerSecurityBundle(
        out_dir, out_dir / "activemq.xml", meta["host"], meta["stomp_ssl_port"],
        out_dir / "pki" / "ca.crt", Identity(meta["hub_identity"],
                                             identities / meta["hub_identity"]),
        {s: Identity(s, identities / s) for s in meta["spoke_ids"]},
        meta.get("federation", DEFAULT_FEDERATION),  # written before federations were named
    )


def _recorded(out_dir: Path) -> dict[str, Any] | None:
    """What :func:`generate_broker_config` recorded in ``out_dir`` (``broker.json``)."""
    try:
        return dict(json.loads((out_dir / "broker.json").read_text()))
    except (FileNotFoundError, ValueError):  # none, or not one of ours: write it again
        return None


def start_broker(bundle: BrokerSecurityBundle, instance_dir: Path | None = None,
                 command_prefix: Sequence[str] = ()) -> str:
    """Run ActiveMQ with the bundle's configuration (state in ``instance_dir``, by default
    ``<out_dir>/instance``); "running" if it already is. ``command_prefix``: see
    :func:`tributary.services.broker.start_instance`."""
    base = (instance_dir or bundle.instance_dir).resolve()
    listening = port_open(bundle.host, bundle.stomp_ssl_port)
    if listening and read_pid(base / "broker.pid") is not None:
        return "running"
    if listening:
        raise ServiceError(f"port {bundle.stomp_ssl_port} is taken by another process")
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o700)
    broker.start_instance(base, bundle.config_path, bundle.host, bundle.stomp_ssl_port,
                          jaas_config=bundle.out_dir / "jaas" / "login.config",
                          command_prefix=command_prefix)
    return "started"


def stop_broker(bundle: BrokerSecurityBundle, instance_dir: Path | None = None) -> bool:
    """Stop the broker :func:`start_broker` started; True if one was running."""
    return broker.stop_instance((instance_dir or bundle.instance_dir).resolve())
