"""deploy() against in-process fake workers: what it ships, and how it wires the chain."""

from __future__ import annotations

from dataclasses import replace

import pytest
from replication import replicate

from coordinator.deploy import deploy, link_emulation, replica_wiring
from coordinator.pipeline import loopback
from coordinator.replicas import without_replicas
from node.client import WorkerHandle
from node.errors import NodeUnreachableError
from node.link import NO_EMULATION, LinkEmulation
from node.messages import StageInfo
from partition.compression import LinkEncoding
from partition.errors import PlanFormatError
from partition.plan import Link, Objective, Plan, PlannedStage, Replica
from partition.spec import StageSpec
from partition.split import StageArtifact


class FakeWorker(WorkerHandle):
    """Records every call; ``down`` makes it unreachable."""

    def __init__(self, name: str, address: str, calls: list, down: bool = False) -> None:
        self.name, self.address, self.calls, self.down = name, address, calls, down

    async def describe(self):
        if self.down:
            raise NodeUnreachableError(f"node {self.name!r} is unreachable")
        self.calls.append(("describe", self.name))

    async def profile(self, model, options):
        raise NotImplementedError

    async def load_stage(self, spec, artifact, progress=None):
        if progress:
            progress(len(artifact), len(artifact))
        self.calls.append(("load", self.name, spec.index))
        return StageInfo(spec.index, spec.artifact_sha256, len(artifact))

    async def wire(self, wiring):
        self.calls.append(("wire", self.name, wiring))

    async def probe(self, target_address, options, *, target_node=None,
                    outbound=NO_EMULATION, inbound=NO_EMULATION):
        raise NotImplementedError

    async def measure_link(self, options):
        raise NotImplementedError

    async def check_health(self, service="", timeout_s=1.0):
        raise NotImplementedError

    def watch_health(self, service=""):
        raise NotImplementedError

    async def open_sender(self, encoding=LinkEncoding.RAW):
        raise NotImplementedError

    async def open_results(self, expected=None):
        raise NotImplementedError

    async def close(self):
        self.calls.append(("close", self.name))


def _plan(nodes: list[str]) -> Plan:
    stages = tuple(
        PlannedStage(k, (Replica(n, f"10.0.0.{k}:1"),), k, k + 1, f"l{k}", f"l{k}", (), (),
                     0.1, 0.0, 1, 2)
        for k, n in enumerate(nodes)
    )
    hops = ["src", *nodes, "src"]
    links = tuple(Link(a, b, 1e6 * (i + 1), 0.001 * (i + 1))
                  for i, (a, b) in enumerate(zip(hops, hops[1:], strict=False)))
    return Plan("0" * 64, "m.pt2", "auto", tuple(f"l{k}" for k in range(len(nodes))), (), (),
                Objective.THROUGHPUT, "src", "src", {}, stages, links, 1.0, 0.5, True, 0.5)


def _artifacts(plan: Plan) -> list[StageArtifact]:
    return [StageArtifact(StageSpec(s.index, s.node, s.start, s.end, (), (), (), (), "ab" * 32),
                          b"x" * (100 * (s.index + 1))) for s in plan.stages]


async def test_deploy_loads_every_stage_then_wires_downstream_first() -> None:
    plan = _plan(["a", "b", "c"])
    calls: list = []
    handles = {s.address: FakeWorker(s.node, s.address, calls) for s in plan.stages}
    progress: list = []
    record = await deploy(plan, _artifacts(plan), emulate_links=True,
                          progress=lambda done, total: progress.append((done, total)),
                          handles=handles)
    loads = [c for c in calls if c[0] == "load"]
    wires = [c for c in calls if c[0] == "wire"]
    assert [c[1] for c in loads] == ["a", "b", "c"]
    assert [c[1] for c in wires] == ["c", "b", "a"]  # no frame reaches an unwired node
    wirings = [c[2] for c in wires]
    assert [[h.address for h in w.next_hops] for w in wirings] == [
        [], ["10.0.0.2:1"], ["10.0.0.1:1"]]
    assert wirings[0].outbound == LinkEmulation(4e6, 0.004)  # the last stage's link to the sink
    assert wirings[1].next_hops[0].link == LinkEmulation(3e6, 0.003)
    assert wirings[2].inbound == LinkEmulation(1e6, 0.001)  # only the first stage emulates
    assert wirings[1].inbound == NO_EMULATION  # the source
    # Each node learns its neighbours' names: whose certificate it forwards to, and whose
    # frames it accepts.
    assert [([h.node for h in w.next_hops], w.previous_nodes) for w in wirings] == [
        ([], ("b",)), (["c"], ("a",)), (["b"], ())]
    assert {w.encoding for w in wirings} == {LinkEncoding.RAW}
    assert progress[-1] == (600, 600)
    assert record.artifact_sha256 == ("ab" * 32,) * 3 and record.emulated_links
    assert not [c for c in calls if c[0] == "close"]  # handles given are left open


async def test_deploy_without_emulation_wires_plain_links() -> None:
    plan = _plan(["a", "b"])
    calls: list = []
    handles = {s.address: FakeWorker(s.node, s.address, calls) for s in plan.stages}
    await deploy(plan, _artifacts(plan), emulate_links=False, handles=handles)
    wirings = [c[2] for c in calls if c[0] == "wire"]
    assert all(w.outbound == NO_EMULATION and w.inbound == NO_EMULATION
               and all(h.link == NO_EMULATION for h in w.next_hops) for w in wirings)


def _encoded_plan() -> Plan:
    """Three stages whose four links carry four different encodings."""
    plan = _plan(["a", "b", "c"])
    encodings = [LinkEncoding.INT8, LinkEncoding.FP16, LinkEncoding.INT8_CHANNEL,
                 LinkEncoding.BF16]
    return replace(plan, links=tuple(replace(link, encoding=e)
                                     for link, e in zip(plan.links, encodings, strict=True)))


ENCODED_AS = {"a": LinkEncoding.FP16, "b": LinkEncoding.INT8_CHANNEL, "c": LinkEncoding.BF16}
"""What each node of :func:`_encoded_plan` sends in: the link after it (the source's link
is the coordinator's to encode)."""


async def test_each_node_sends_in_its_outbound_links_encoding() -> None:
    plan = _encoded_plan()
    calls: list = []
    handles = {s.address: FakeWorker(s.node, s.address, calls) for s in plan.stages}
    await deploy(plan, _artifacts(plan), emulate_links=False, handles=handles)
    assert {c[1]: c[2].encoding for c in calls if c[0] == "wire"} == ENCODED_AS


def test_failover_rewires_each_node_in_its_outbound_links_encoding() -> None:
    plan = _encoded_plan()
    wirings = {s.node: replica_wiring(plan, k, s.node, emulate=False)
               for k, s in enumerate(plan.stages)}
    assert {node: wiring.encoding for node, wiring in wirings.items()} == ENCODED_AS
    recoded = replace(plan, links=(*plan.links[:2], replace(plan.links[2],
                                                            encoding=LinkEncoding.RAW),
                                   plan.links[3]))
    assert replica_wiring(recoded, 1, "b", emulate=False) != wirings["b"]  # rewires "b"


async def test_deploy_checks_every_node_before_shipping_anything() -> None:
    plan = _plan(["a", "b"])
    calls: list = []
    handles = {s.address: FakeWorker(s.node, s.address, calls, down=s.node == "b")
               for s in plan.stages}
    with pytest.raises(NodeUnreachableError, match="'b'"):
        await deploy(plan, _artifacts(plan), emulate_links=False, handles=handles)
    assert not [c for c in calls if c[0] in ("load", "wire")]


def test_a_link_within_one_node_is_never_emulated() -> None:
    assert link_emulation(Link("a", "a", 1e6, 0.01), emulate=True) == NO_EMULATION
    assert link_emulation(Link("a", "b", 1e6, 0.01), emulate=False) == NO_EMULATION
    link = Link("a", "b", 1e6, 0.01)
    assert link_emulation(replace(link), emulate=True) == LinkEmulation(1e6, 0.01)


def _replicated() -> Plan:
    """:func:`_plan` over a, b, c with the middle stage on b (3/4) and d (1/4)."""
    plan = _plan(["a", "b", "c"])
    plan = replace(plan, addresses={"a": "10.0.0.0:1", "b": "10.0.0.1:1", "c": "10.0.0.2:1",
                                    "d": "10.0.0.3:1", "src": "10.0.0.9:1"})
    return replicate(plan, 1, [("b", 0.75), ("d", 0.25)])


async def test_deploy_ships_a_replicated_stage_to_each_replica_and_wires_the_shares() -> None:
    plan = _replicated()
    calls: list = []
    handles = {r.address: FakeWorker(r.node, r.address, calls)
               for s in plan.stages for r in s.replicas}
    artifacts = _artifacts(plan)
    record = await deploy(plan, artifacts, emulate_links=False, handles=handles)
    assert [c[1:] for c in calls if c[0] == "load"] == [("a", 0), ("b", 1), ("d", 1), ("c", 2)]
    wirings = {c[1]: c[2] for c in calls if c[0] == "wire"}
    assert [c[1] for c in calls if c[0] == "wire"][-1] == "a"  # downstream first
    assert [(h.node, h.share) for h in wirings["a"].next_hops] == [("b", 0.75), ("d", 0.25)]
    assert [h.node for h in wirings["b"].next_hops] == [h.node for h in wirings["d"].next_hops]
    assert wirings["c"].previous_nodes == ("b", "d")  # c accepts frames from both replicas
    assert record.artifact_sha256 == (artifacts[0].spec.artifact_sha256,) * 4


def test_leaving_out_a_replica_rewires_its_neighbours_only() -> None:
    plan = _replicated()
    smaller = without_replicas(plan, {"d"})
    assert smaller is not None and smaller.stages[1].replicas == (Replica("b", "10.0.0.1:1", 1.0),)
    assert [(link.src, link.dst) for link in smaller.links] == [
        ("src", "a"), ("a", "b"), ("b", "c"), ("c", "src")]
    before = {n: replica_wiring(plan, k, n, emulate=True)
              for k, s in enumerate(plan.stages) for n in s.nodes}
    after = {n: replica_wiring(smaller, k, n, emulate=True)
             for k, s in enumerate(smaller.stages) for n in s.nodes}
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {"a", "c"}  # the predecessor deals to b alone; c no longer expects d
    assert [(h.node, h.share) for h in after["a"].next_hops] == [("b", 1.0)]
    assert after["c"].previous_nodes == ("b",)
    assert without_replicas(plan, {"a"}) is None  # a stage's only node: re-plan
    assert without_replicas(smaller, {"b"}) is None
    assert without_replicas(plan, {"elsewhere"}) is plan


def test_a_sender_sends_one_hop_in_one_encoding() -> None:
    plan = _replicated()
    links = list(plan.links)
    links[1] = replace(links[1], encoding=LinkEncoding.FP16)  # a -> b, but a -> d stays raw
    with pytest.raises(PlanFormatError, match="hop 1 from 'a'"):
        replica_wiring(replace(plan, links=tuple(links)), 0, "a", emulate=False)


@pytest.mark.parametrize("host, here", [
    ("127.0.0.1", True), ("localhost", True), ("198.18.3.7", True), ("198.19.255.1", True),
    ("10.0.0.1", False), ("198.20.0.1", False), ("jetson.local", False),
])
def test_links_are_emulated_by_default_only_on_this_machine(host: str, here: bool) -> None:
    plan = _plan(["a"])
    plan = replace(plan, addresses={"a": f"{host}:50051", "src": "127.0.0.1:1"})
    assert loopback(plan) is here
