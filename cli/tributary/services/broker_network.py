"""Brokers near the spokes: a hub broker and edge brokers joined by ActiveMQ network
bridges (store-and-forward), so a spoke on another continent talks to a nearby broker.

Each edge broker has the same mutual TLS and per-spoke authorization as the hub broker, for
the spokes attached to it, and its own certificate from the federation CA whose subject is
its *bridge identity* (``bridge-<edge>``). It opens one duplex network connector to the hub
broker's bridge port (OpenWire over mutual TLS) that carries exactly the hub's queues
(results, federated and vertical training: edge to hub) and its spokes' queues (studies,
training, vertical: hub to edge) with their dead-letter queues; at the hub
broker that identity may touch nothing else. Forwarding follows consumer demand: results
wait in the edge's persistent store until the hub consumes them through the bridge, and a
spoke's messages wait at the hub broker until the spoke is connected to its edge. A bridge
outage therefore delays messages but loses none; ``auditNetworkProducers`` stops one that
is forwarded again after a lost acknowledgement from being stored twice.

Layout, added to the folder of :func:`~tributary.services.broker_security.generate_broker_config`::

    network.json            the edges and their spokes, to regenerate (no secrets)
    edges/<edge>/           one edge broker: activemq.xml (0600), jaas/, broker/ (its
                            certificate, key store, trust store), instance/ when started
"""

from __future__ import annotations

import shutil
from pathlib import Path
from xml.sax.saxutils import quoteattr

from cryptography import x509
from cryptography.x509.oid import NameOID
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tributary.protocol.destinations import dead_letter_queue
from tributary.protocol.messages import SPOKE_ID_RE
from tributary.services import pki
from tributary.services.broker_security import (
    ALL_GROUP,
    DEFAULT_STOMP_SSL_PORT,
    SPOKES_GROUP,
    BrokerSecurityBundle,
    Identity,
    bridge_group,
    generate_broker_config,
    hub_queues,
    load_bundle,
    render_config,
    security_xml,
    spoke_group,
    spoke_queues,
    write_jaas,
)
from tributary.services.system import ServiceError

NETWORK_FILE = "network.json"
DEFAULT_BRIDGE_PORT = 61617
EDGES_DIR = "edges"
#: The edge-side user of the bridge connection, named by the hub broker's certificate.
HUB_BROKER_USER = "hub-broker"


class EdgeBroker(BaseModel):
    """One broker near a group of spokes."""

    model_config = ConfigDict(extra="forbid")

    name: str
    host: str = Field(min_length=1)
    port: int = Field(DEFAULT_STOMP_SSL_PORT, ge=1, le=65535)
    #: More DNS names or addresses the spokes dial for this edge.
    server_names: list[str] = Field(default_factory=list)
    spokes: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not SPOKE_ID_RE.fullmatch(value):
            raise ValueError(f"edge name {value!r} must be 2-63 lower-case letters, digits "
                             "or '-'")
        return value

    @property
    def bridge_identity(self) -> str:
        return f"bridge-{self.name}"


class BrokerNetwork(BaseModel):
    """``network.json``: where the hub broker takes bridges and which spoke uses which edge.
    Operators may write it by hand and pass it to ``tributary broker config --network``."""

    model_config = ConfigDict(extra="forbid")

    #: Host and port edge brokers dial for the hub broker's bridge connector.
    hub_bridge_host: str | None = None
    hub_bridge_port: int = Field(DEFAULT_BRIDGE_PORT, ge=1, le=65535)
    #: The port edges dial when a relay or port forward stands in front of the bridge port.
    hub_bridge_dial_port: int | None = Field(None, ge=1, le=65535)
    edges: list[EdgeBroker] = Field(default_factory=list)

    def check(self, spoke_ids: list[str], hub_identity: str) -> None:
        """Refuse duplicate edges, spokes on two edges and names that clash."""
        names = [e.name for e in self.edges]
        reserved = {hub_identity, HUB_BROKER_USER, *(e.bridge_identity for e in self.edges)}
        clash = sorted(reserved & set(spoke_ids))
        if clash:
            raise ValueError(f"spoke id(s) {', '.join(clash)} clash with a broker identity")
        if len(set(names)) != len(names):
            raise ValueError("two edges have the same name")
        seen: dict[str, str] = {}
        for edge in self.edges:
            for spoke in edge.spokes:
                if spoke not in spoke_ids:
                    raise ValueError(f"edge {edge.name!r} names unknown spoke {spoke!r}")
                if spoke in seen:
                    raise ValueError(f"spoke {spoke!r} is attached to both {seen[spoke]!r} "
                                     f"and {edge.name!r}")
                seen[spoke] = edge.name


def network_from_options(edges: list[str], edge_spokes: list[str], bridge_host: str | None,
                         bridge_port: int, network_file: Path | None) -> BrokerNetwork | None:
    """The network from ``--edge NAME=HOST:PORT`` and ``--edge-spoke NAME=SPOKE`` options or
    a ``network.json`` file; None when neither names an edge."""
    if network_file is not None:
        if edges or edge_spokes:
            raise ValueError("pass either --network or --edge/--edge-spoke, not both")
        return BrokerNetwork.model_validate_json(network_file.read_text())
    if not edges:
        if edge_spokes:
            raise ValueError("--edge-spoke names an edge; declare it with --edge")
        return None
    parsed: dict[str, EdgeBroker] = {}
    for option in edges:
        name, _, address = option.partition("=")
        host, _, port = address.rpartition(":")
        if not (name and host and port.isdigit()):
            raise ValueError(f"--edge {option!r}: expected NAME=HOST:PORT")
        if name in parsed:
            raise ValueError(f"edge {name!r} declared twice")
        parsed[name] = EdgeBroker(name=name, host=host.strip("[]"), port=int(port))
    for option in edge_spokes:
        name, _, spoke = option.partition("=")
        if name not in parsed or not spoke:
            raise ValueError(f"--edge-spoke {option!r}: expected NAME=SPOKE with NAME an --edge")
        parsed[name].spokes.append(spoke)
    return BrokerNetwork(hub_bridge_host=bridge_host, hub_bridge_port=bridge_port,
                         edges=list(parsed.values()))


def _network_xml(edge: EdgeBroker, hub_host: str, hub_port: int, federation: str) -> str:
    """The edge's duplex bridge to the hub broker, limited to what must cross: the hub's
    queues (results, federated and vertical training) and the edge's spokes' queues, with
    their dead-letter queues."""
    crossing = hub_queues(federation) + [q for spoke in sorted(edge.spokes)
                                         for q in spoke_queues(spoke, federation)]
    queues = [q for queue in crossing for q in (queue, dead_letter_queue(queue))]
    includes = "\n".join(
        f"          <queue physicalName={quoteattr(q.removeprefix('/queue/'))}/>"
        for q in queues)
    uri = (f"static:(ssl://{hub_host}:{hub_port})?initialReconnectDelay=500"
           "&maxReconnectDelay=2000&useExponentialBackOff=false")
    return f"""    <networkConnectors>
      <networkConnector name={quoteattr(f"{edge.name}-to-hub")} uri={quoteattr(uri)}
                        duplex="true" networkTTL="1" conduitSubscriptions="false"
                        decreaseNetworkConsumerPriority="true" bridgeTempDestinations="false">
        <dynamicallyIncludedDestinations>
{includes}
        </dynamicallyIncludedDestinations>
      </networkConnector>
    </networkConnectors>
"""


def _common_name(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or any(c in str(cn[0].value) for c in ",=+\\\n"):
        raise ServiceError(f"{cert_path} has no plain common name")
    return str(cn[0].value)


def edge_dir(out_dir: Path, edge: str) -> Path:
    return out_dir.resolve() / EDGES_DIR / edge


def _edge_bundle(out_dir: Path, edge: EdgeBroker, hub_identity: str,
                 federation: str) -> BrokerSecurityBundle:
    identities = out_dir / "identities"
    return BrokerSecurityBundle(
        edge_dir(out_dir, edge.name), edge_dir(out_dir, edge.name) / "activemq.xml",
        edge.host, edge.port, out_dir / "pki" / "ca.crt",
        Identity(hub_identity, identities / hub_identity),
        {s: Identity(s, identities / s) for s in sorted(edge.spokes)}, federation)


def _write_edge(out_dir: Path, edge: EdgeBroker, hub_host: str, hub_port: int,
                hub_identity: str, rotate: bool, federation: str) -> BrokerSecurityBundle:
    directory = edge_dir(out_dir, edge.name)
    broker_dir = directory / "broker"
    broker_dir.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    broker_dir.chmod(0o700)
    ca = pki.ensure_ca(out_dir / "pki")
    server = pki.issue_bridge_cert(ca, broker_dir, edge.bridge_identity,
                                   [edge.host, *edge.server_names], rotate=rotate)
    password_file = broker_dir / "store.password"
    renew = rotate or server.created or not password_file.exists()
    password = pki.read_or_create_secret(password_file, rotate=renew)
    keystore, truststore = broker_dir / "broker.p12", broker_dir / "truststore.p12"
    if renew or not keystore.exists():
        pki.write_keystore(keystore, server, ca, password)
    if renew or not truststore.exists():
        pki.write_truststore(truststore, ca, password)
    spokes = sorted(edge.spokes)
    carried = {edge.bridge_identity: spokes}
    xml = render_config(edge.host, edge.port,
                        security_xml(spokes, keystore, truststore, password, carried,
                                     federation),
                        network_xml=_network_xml(edge, hub_host, hub_port, federation))
    xml = xml.replace('brokerName="tributary"', f'brokerName={quoteattr(edge.name)}', 1)
    pki.write_private(directory / "activemq.xml", xml.encode())
    users = [(s, [spoke_group(s), SPOKES_GROUP, ALL_GROUP]) for s in spokes]
    # The bridge's own connection into this broker carries the certificate of the peer it
    # dialled, the hub broker's: that subject is a user in the bridge's group. (That
    # certificate is for TLS servers only, so no client can log in with it over the wire.)
    bridge_groups = [bridge_group(edge.bridge_identity), ALL_GROUP]
    users += [(edge.bridge_identity, bridge_groups), (HUB_BROKER_USER, bridge_groups)]
    write_jaas(directory, users)
    users_file = directory / "jaas" / "users.properties"
    hub_cn = _common_name(out_dir / "broker" / "server.crt")
    users_file.write_text(users_file.read_text().replace(
        f"{HUB_BROKER_USER}=CN={HUB_BROKER_USER}\n", f"{HUB_BROKER_USER}=CN={hub_cn}\n"))
    return _edge_bundle(out_dir, edge, hub_identity, federation)


def generate_network(out_dir: Path, network: BrokerNetwork, hub_identity: str = "hub",
                     spoke_ids: list[str] | tuple[str, ...] = (), host: str = "127.0.0.1",
                     stomp_ssl_port: int = DEFAULT_STOMP_SSL_PORT,
                     server_names: list[str] | tuple[str, ...] = (),
                     rotate: bool = False, rotate_ca: bool | None = None,
                     federation: str | None = None,
                     ) -> tuple[BrokerSecurityBundle, dict[str, BrokerSecurityBundle]]:
    """Write the hub broker (with its bridge connector) and every edge broker of
    ``network`` into ``out_dir``; spokes of an edge are also known to the hub broker, so a
    spoke can move between its edge and the hub broker without new certificates.
    ``federation``: as for :func:`generate_broker_config` (every broker opens the same
    federation's queues)."""
    spokes = sorted(set(spoke_ids) | {s for e in network.edges for s in e.spokes})
    network.check(spokes, hub_identity)
    bridges = {e.bridge_identity: sorted(e.spokes) for e in network.edges}
    hub = generate_broker_config(out_dir, hub_identity=hub_identity, spoke_ids=spokes,
                                 host=host, stomp_ssl_port=stomp_ssl_port,
                                 server_names=server_names, rotate=rotate,
                                 rotate_ca=rotate_ca, bridges=bridges,
                                 bridge_port=network.hub_bridge_port,
                                 federation=federation)
    hub_bridge_host = network.hub_bridge_host or host
    out_dir = hub.out_dir
    dial_port = network.hub_bridge_dial_port or network.hub_bridge_port
    edges = {e.name: _write_edge(out_dir, e, hub_bridge_host, dial_port, hub_identity, rotate,
                                 hub.federation)
             for e in network.edges}
    known = {e.name for e in network.edges}
    if (out_dir / EDGES_DIR).exists():
        for stale in (out_dir / EDGES_DIR).iterdir():
            if stale.name not in known and not (stale / "instance" / "broker.pid").exists():
                shutil.rmtree(stale)
    (out_dir / NETWORK_FILE).write_text(network.model_dump_json(indent=2) + "\n")
    return hub, edges


def load_network(out_dir: Path) -> BrokerNetwork:
    path = out_dir.resolve() / NETWORK_FILE
    try:
        return BrokerNetwork.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise ServiceError(f"no broker network in {out_dir}; run `tributary broker config "
                           "--edge ...` first") from None


def load_edge(out_dir: Path, name: str, hub_identity: str = "hub") -> BrokerSecurityBundle:
    """The bundle of edge ``name``, to start or stop it like the hub broker's."""
    for edge in load_network(out_dir).edges:
        if edge.name == name:
            return _edge_bundle(out_dir.resolve(), edge, hub_identity,
                                load_bundle(out_dir).federation)
    raise ServiceError(f"no edge broker {name!r} in {out_dir}")


def regenerate_brokers(out_dir: Path, hub_identity: str, spoke_ids: list[str], host: str,
                       stomp_ssl_port: int, server_names: list[str], rotate: bool = False,
                       rotate_ca: bool | None = None) -> BrokerSecurityBundle:
    """Rewrite the hub broker and, when ``out_dir`` has a ``network.json``, its edge brokers,
    for exactly ``spoke_ids`` (a spoke no longer listed, e.g. revoked, leaves its edge too).
    What ``tributary pki`` calls, so issuing, rotating and revoking keep the bridges."""
    path = out_dir.resolve() / NETWORK_FILE
    if not path.exists():
        return generate_broker_config(out_dir, hub_identity=hub_identity, spoke_ids=spoke_ids,
                                      host=host, stomp_ssl_port=stomp_ssl_port,
                                      server_names=server_names, rotate=rotate,
                                      rotate_ca=rotate_ca)
    network = load_network(out_dir)
    for edge in network.edges:
        edge.spokes = [s for s in edge.spokes if s in spoke_ids]
    hub, _ = generate_network(out_dir, network, hub_identity=hub_identity, spoke_ids=spoke_ids,
                              host=host, stomp_ssl_port=stomp_ssl_port,
                              server_names=server_names, rotate=rotate, rotate_ca=rotate_ca)
    return hub
