"""Network namespaces without the kernel: the ``ip``/``tc`` commands a cluster's namespaces
are made, shaped, cut and healed with, the state record, and the line saying why they
cannot be made."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from coordinator import netns
from coordinator.isolation import IsolationError
from coordinator.netns import RANGE, Namespaces, check_available
from partition.cluster import ClusterSpec, MediumSpec, parse_cluster

MBPS = 1e6 / 8
"""Bytes per second in one megabit per second."""


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every command the module runs, recorded instead of run. A block's route can be added
    only while no other route holds it, as in the kernel."""
    ran: list[list[str]] = []
    claimed: set[str] = set()

    def run(command: list[str]) -> None:
        ran.append(command)
        if command[:4] == ["ip", "route", "add", "unreachable"]:
            if command[4] in claimed:
                raise IsolationError("RTNETLINK answers: File exists")
            claimed.add(command[4])
        if command[:4] == ["ip", "route", "delete", "unreachable"]:
            claimed.discard(command[4])

    monkeypatch.setattr(netns, "run", run)
    monkeypatch.setattr(netns, "check_available", lambda: None)
    return ran


def three_nodes() -> ClusterSpec:
    """a (the source and sink), b, c; a<->b at 40/16 Mbps, the rest 100 Mbps."""
    return parse_cluster({
        "nodes": [{"name": name, "address": f"127.0.0.1:{7000 + i}", "memory": "1GiB"}
                  for i, name in enumerate("abc")],
        "links": {"default": {"bandwidth": "100Mbps", "latency": "1ms"}, "overrides": [
            {"from": "a", "to": "b", "bandwidth": "40Mbps", "latency": "1ms"},
            {"from": "b", "to": "a", "bandwidth": "16Mbps", "latency": "1ms"},
        ]},
        "source": "a",
        "sink": "a",
    }, "test")


def rates(commands: list[list[str]]) -> dict[tuple[str, str], float]:
    """(namespace or "root", link) -> the tbf rate its egress got, in Mbit/s."""
    shaped = {}
    for command in commands:
        if command[0] == "tc":
            where = command[2] if command[1] == "-n" else "root"
            link = command[command.index("dev") + 1]
            rate = command[command.index("rate") + 1]
            shaped[where, link] = int(rate.removesuffix("bit")) / 1e6
    return shaped


def test_claim_takes_a_free_block_and_names_each_node(commands: list[list[str]]) -> None:
    cluster = three_nodes()
    namespaces = Namespaces.claim(cluster, "seed")
    block = ipaddress.ip_network(namespaces.block)
    assert block.subnet_of(RANGE) and block.prefixlen == 24
    assert namespaces.prefix.startswith("es-") and len(namespaces.prefix) == 10
    assert [n.namespace for n in namespaces.nodes] == [namespaces.prefix + n for n in "abc"]
    addresses = [ipaddress.ip_address(a) for n in namespaces.nodes for a in (n.home, n.root_end)]
    assert all(a in block for a in addresses) and len(set(addresses)) == 6
    assert all(len(n.root_link) <= 15 for n in namespaces.nodes)  # the kernel's limit
    homes = namespaces.at_home(cluster)
    assert [n.address for n in homes.nodes] == [f"{n.home}:{7000 + i}"
                                                for i, n in enumerate(namespaces.nodes)]
    assert homes.links == cluster.links


def test_the_same_seed_gets_the_same_block_unless_it_is_taken(
    commands: list[list[str]]
) -> None:
    first = Namespaces.claim(three_nodes(), "state dir")
    second = Namespaces.claim(three_nodes(), "state dir")  # while the first holds its block
    blocks = list(RANGE.subnets(new_prefix=24))
    index = blocks.index(ipaddress.ip_network(first.block))
    assert second.block == str(blocks[(index + 1) % len(blocks)])
    assert second.prefix != first.prefix
    first.remove()
    assert Namespaces.claim(three_nodes(), "state dir").block == first.block
    assert Namespaces.claim(three_nodes(), "another").block not in (first.block, second.block)


def test_a_claim_that_fails_otherwise_is_not_retried(
    commands: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(command: list[str]) -> None:
        commands.append(command)
        raise IsolationError("`ip route add ...` failed: RTNETLINK answers: Operation not "
                             "permitted")

    monkeypatch.setattr(netns, "run", refuse)
    with pytest.raises(IsolationError, match="Operation not permitted"):
        Namespaces.claim(three_nodes(), "seed")
    assert len(commands) == 1


def test_unsafe_node_names_name_namespaces_by_index(commands: list[list[str]]) -> None:
    cluster = parse_cluster({
        "nodes": [{"name": "camera board", "address": "127.0.0.1:1", "memory": "1GiB"},
                  {"name": "../etc", "address": "127.0.0.1:2", "memory": "1GiB"}],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }, "test")
    namespaces = Namespaces.claim(cluster, "seed")
    assert [n.namespace for n in namespaces.nodes] == [namespaces.prefix + "n0",
                                                       namespaces.prefix + "n1"]


def test_build_shapes_each_direction_of_each_link(commands: list[list[str]]) -> None:
    cluster = three_nodes()
    namespaces = Namespaces.claim(cluster, "seed")
    namespaces.build(cluster)
    a, b, c = namespaces.nodes
    assert rates(commands) == pytest.approx({
        (a.namespace, "peer1"): 40, (b.namespace, "peer0"): 16,   # a <-> b, each way
        (a.namespace, "peer2"): 100, (c.namespace, "peer0"): 100,
        (b.namespace, "peer2"): 100, (c.namespace, "peer1"): 100,
        # this machine to a node as from the source (a), a node to it as to the sink (a)
        ("root", b.root_link): 40, (b.namespace, "host"): 16,
        ("root", c.root_link): 100, (c.namespace, "host"): 100,
    })  # a is the source and the sink: its link to this machine is not shaped
    for node in namespaces.nodes:
        peers = {p.home for p in namespaces.nodes if p is not node} | {node.root_end}
        routed = {command[5].removesuffix("/32") for command in commands
                  if command[:6:2] == ["ip", node.namespace, "replace"]}
        assert routed == peers, node


def test_cut_takes_every_link_down_and_heal_routes_them_again(
    commands: list[list[str]]
) -> None:
    namespaces = Namespaces.claim(three_nodes(), "seed")
    b = namespaces.node("b")
    commands.clear()
    namespaces.cut("b")
    assert commands == [["ip", "-n", b.namespace, "link", "set", link, "down"]
                        for link in ("host", "peer0", "peer2")]
    commands.clear()
    namespaces.heal("b")
    routes = [c[7] for c in commands if c[4] == "replace"]
    assert routes == ["host", "peer0", "peer2"]
    assert [c[5] for c in commands if c[4] == "replace"] == [
        f"{b.root_end}/32", f"{namespaces.node('a').home}/32", f"{namespaces.node('c').home}/32"]


def test_remove_deletes_the_claim_and_is_safe_to_repeat(commands: list[list[str]]) -> None:
    namespaces = Namespaces.claim(three_nodes(), "seed")
    commands.clear()
    namespaces.remove()  # nothing else exists here: only the claim is deleted
    namespaces.remove()
    assert commands == [["ip", "route", "delete", "unreachable", namespaces.block]] * 2


def test_state_record_round_trips_and_refuses_foreign_names(commands: list[list[str]]) -> None:
    namespaces = Namespaces.claim(three_nodes(), "seed")
    record = namespaces.to_dict()
    assert Namespaces.from_dict(record) == namespaces
    foreign = [
        {**record, "prefix": "docker-"},
        {**record, "block": "10.0.0.0/24"},
        {**record, "nodes": [{**record["nodes"][0], "namespace": "default"}]},
    ]
    for data in foreign:
        with pytest.raises(ValueError, match="not edgesplit's"):
            Namespaces.from_dict(data)


def test_too_many_nodes_is_one_line(commands: list[list[str]]) -> None:
    cluster = parse_cluster({
        "nodes": [{"name": f"n{i}", "address": f"127.0.0.1:{i + 1}", "memory": "1GiB"}
                  for i in range(netns.MAX_NODES + 1)],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }, "test")
    with pytest.raises(IsolationError, match=f"at most {netns.MAX_NODES} nodes and "
                       f"{netns.MAX_MEDIA} media .* has {netns.MAX_NODES + 1} and 0"):
        Namespaces.claim(cluster, "seed")
    assert commands == []


def test_unavailable_says_why_and_to_use_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.sys, "platform", "linux")
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else tool)
    with pytest.raises(IsolationError, match="needs the `tc` command .*; use --isolation none"):
        check_available()
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(IsolationError, match="needs root .*; use --isolation none"):
        check_available()


def test_a_medium_has_a_namespace_linked_to_its_nodes_only(commands: list[list[str]]) -> None:
    cluster = replace(three_nodes(), media=(MediumSpec("air", 5e6, ("a", "c")),))
    namespaces = Namespaces.claim(cluster, "seed")
    namespaces.build(cluster)
    [air] = namespaces.media
    assert air.home in {str(h) for h in ipaddress.ip_network(namespaces.block).hosts()}
    assert air.home not in {n.home for n in namespaces.nodes} | {
        n.root_end for n in namespaces.nodes}
    veths = [c for c in commands if c[:3] == ["ip", "link", "add"] and air.namespace in c]
    assert [c[c.index("netns") + 1] for c in veths] == [
        namespaces.node("a").namespace, namespaces.node("c").namespace]
    for name in "abc":  # each node routes the arbiter's address over its own link, or not
        routed = {c[5].removesuffix("/32") for c in commands
                  if c[:6:2] == ["ip", namespaces.node(name).namespace, "replace"]}
        assert (air.home in routed) is (name in "ac"), name
    assert rates(commands).keys().isdisjoint({(air.namespace, "peer0"), (air.namespace, "peer2")})
    assert Namespaces.from_dict(namespaces.to_dict()) == namespaces
    with pytest.raises(ValueError, match="not edgesplit's"):
        record = namespaces.to_dict()
        Namespaces.from_dict({**record, "media": [{**record["media"][0], "namespace": "x"}]})
