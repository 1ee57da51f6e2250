"""Edge brokers' options and the bridge identity's authorization, without a broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tributary.services.broker_network import (
    BrokerNetwork,
    EdgeBroker,
    generate_network,
    network_from_options,
    regenerate_brokers,
)
from tributary.services.broker_security import authorization_entries, bridge_group


def test_edge_options_parse_and_refuse_nonsense(tmp_path: Path) -> None:
    spec = network_from_options(["eu=edge.example.org:61614"], ["eu=site-a"], "hub.example",
                                61617, None)
    assert spec is not None and spec.edges[0].spokes == ["site-a"]
    assert spec.edges[0].bridge_identity == "bridge-eu"
    assert network_from_options([], [], None, 61617, None) is None
    for edges, attach in [(["eu=nohostport"], []), (["eu=h:1", "eu=h:2"], []),
                          ([], ["eu=site-a"]), (["eu=h:1"], ["asia=site-a"]),
                          (["EU!=h:1"], [])]:
        with pytest.raises(ValueError):
            network_from_options(edges, attach, None, 61617, None)
    with pytest.raises(ValueError, match="both"):
        BrokerNetwork(edges=[EdgeBroker(name="eu", host="h", spokes=["site-a"]),
                             EdgeBroker(name="us", host="h", spokes=["site-a"])]
                      ).check(["site-a"], "hub")
    with pytest.raises(ValueError, match="clash"):
        BrokerNetwork(edges=[EdgeBroker(name="eu", host="h")]).check(["bridge-eu"], "hub")


def test_bridge_may_touch_only_the_hubs_queues_and_its_spokes_queues() -> None:
    entries = authorization_entries(["site-a", "site-b"], {"bridge-eu": ["site-a"]})
    group = bridge_group("bridge-eu")
    granted = [e for e in entries if group in e]
    queues = sorted(e.split('queue="')[1].split('"')[0] for e in granted)
    hub_side = ["tributary.results", "tributary.training", "tributary.vertical"]
    spoke_side = ["tributary.spoke.site-a", "tributary.spoke.site-a.training",
                  "tributary.spoke.site-a.vertical"]
    assert queues == sorted(q for queue in hub_side + spoke_side
                            for q in (queue, "DLQ." + queue))
    # Not another spoke's queues, whatever their kind.
    assert not [q for q in queues if "site-b" in q]


def test_regenerating_for_fewer_spokes_takes_a_spoke_off_its_edge(tmp_path: Path) -> None:
    network = BrokerNetwork(edges=[EdgeBroker(name="eu", host="127.0.0.1", port=61624,
                                              spokes=["site-a", "site-b"])])
    generate_network(tmp_path, network, spoke_ids=["site-c"])
    users = tmp_path / "edges" / "eu" / "jaas" / "users.properties"
    assert "site-b=CN=site-b" in users.read_text()
    assert "hub-broker=CN=127.0.0.1" in users.read_text()
    hub_xml = (tmp_path / "activemq.xml").read_text()
    assert 'name="bridges"' in hub_xml and "bridge-eu" not in hub_xml.split("<plugins>")[0]

    regenerate_brokers(tmp_path, "hub", ["site-a", "site-c"], "127.0.0.1", 61614, [])
    assert "site-b" not in users.read_text()
    assert "site-b" not in (tmp_path / "edges" / "eu" / "activemq.xml").read_text()
    assert 'name="bridges"' in (tmp_path / "activemq.xml").read_text()


def _queues(xml: str) -> set[str]:
    return {part.split('"')[0] for part in xml.split('queue="')[1:]} | \
        {part.split('"')[0] for part in xml.split('physicalName="')[1:]}


def test_a_named_federation_opens_its_own_queues_and_no_others(tmp_path: Path) -> None:
    """A hub configured with ``broker_federation = "west"`` uses ``west.*`` queues: the
    secured brokers' authorization maps and bridges name those, and every other federation's
    stay closed (destinations not listed are closed to every client)."""
    network = BrokerNetwork(edges=[EdgeBroker(name="eu", host="127.0.0.1", port=61624,
                                              spokes=["site-a"])])
    hub, edges = generate_network(tmp_path, network, spoke_ids=["site-b"], federation="west")
    assert hub.federation == "west" and hub.broker_settings("site-a").federation == "west"
    assert edges["eu"].federation == "west"
    hub_xml = (tmp_path / "activemq.xml").read_text()
    edge_xml = (tmp_path / "edges" / "eu" / "activemq.xml").read_text()
    for xml in (hub_xml, edge_xml):
        named = {q for q in _queues(xml) if ">" not in q and "&gt;" not in q}  # not wildcards
        assert "west.results" in named and "DLQ.west.spoke.site-a" in named
        assert all(q.removeprefix("DLQ.").startswith("west.") for q in named), named
    assert "west.spoke.site-a.training" in _queues(edge_xml.split("<plugins>")[0])  # bridged
    # Regenerating (a spoke issued or revoked through `tributary pki`) keeps the federation.
    regenerate_brokers(tmp_path, "hub", ["site-a"], "127.0.0.1", 61614, [])
    assert "west.spoke.site-a" in _queues((tmp_path / "activemq.xml").read_text())
    assert not {q for q in _queues((tmp_path / "activemq.xml").read_text())
                if q.startswith("tributary.")}
    with pytest.raises(ValueError, match="federation"):
        generate_network(tmp_path / "bad", network, federation="West Coast")
