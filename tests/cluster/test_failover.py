"""Chaos tests: nodes of a 4-node simulated cluster are killed, hung, drained, restarted and
slowed down (a node or a link) while 500 requests run with 8 in flight. Every request must be
answered once, by outputs equal to the single-process model's; each test prints detection and
recovery.

One cluster serves the module: before each test, nodes that were killed are started again,
hung ones continued, and the plan deployed afresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.bench import random_inputs
from coordinator.bench_check import CheckedRun, Reference, run_checked
from coordinator.deploy import deploy, link_emulation
from coordinator.drift import POLL_S, WINDOW
from coordinator.local_cluster import LocalCluster, LocalNode
from coordinator.pipeline import Pipeline
from coordinator.ports import free_ports
from coordinator.recovery import PlanRecovery
from node.client import GrpcWorkerHandle
from node.errors import NodeUnreachableError
from node.health import is_serving
from node.link import LinkEmulation
from node.messages import Hop, Wiring
from partition.artifact import ProgramRunner
from partition.cluster import ClusterSpec, parse_cluster
from partition.cost_builder import node_profiles
from partition.layers import build_layer_graph
from partition.plan import Objective, Plan
from partition.planning import plan
from partition.profiler import profile_layers
from partition.split import StageArtifact, split

REQUESTS = 500
IN_FLIGHT = 8
SPEED = 0.1
"""Every node's emulated speed: compute sleeps, so four workers fit on two cores."""
DETECTION_BOUND_S = 5.0
"""A loose sanity bound; the target is 2 s, printed exactly."""
LINK_SLOWDOWN = 4.0
"""How many times the plan's bottleneck the degraded link takes per frame."""
DEPLOY_ATTEMPTS = 3
"""Deploys heal tries before giving up on a node that was just started again."""
WAIT_S = 60.0
"""Longest wait for the pipeline to notice something (a generous bound against hangs)."""

Action = Callable[[], Awaitable[None] | None]


def cluster_spec() -> ClusterSpec:
    return parse_cluster({
        "nodes": [{"name": f"n{i}", "address": f"127.0.0.1:{free_ports(1)[0]}", "memory": "1GiB",
                   "speed": SPEED} for i in range(4)],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
        "source": "n0",
        "sink": "n0",
    }, "chaos cluster")


@dataclass
class ChaosCluster:
    """The module's cluster, its plan and stages, and a recovery prepared for the plan."""

    plan: Plan
    artifacts: list[StageArtifact]
    local: LocalCluster
    reference: Reference
    recovery: PlanRecovery

    def node(self, name: str) -> LocalNode:
        return next(n for n in self.local.nodes if n.name == name)

    def stage_node(self, pipeline: Pipeline, stage: int) -> LocalNode:
        """The process of the node that runs ``stage`` in the pipeline's current plan."""
        return self.node(pipeline.plan.stages[stage].node)

    def heal(self) -> None:
        """Continue hung nodes and reset their speed; start again every node that does not
        say SERVING (killed, departed or still leaving); deploy the plan."""
        for node in self.local.nodes:
            signal_node(node, signal.SIGCONT)
        for node in self.local.nodes:
            if serving(node):
                signal_node(node, signal.SIGUSR2)
            else:
                self.local.restart(node.name)
        for attempt in range(DEPLOY_ATTEMPTS):
            try:
                asyncio.run(deploy(self.plan, self.artifacts, emulate_links=True))
                return
            except NodeUnreachableError:
                # Seen twice in CI: a deploy right after a restart was refused by the node
                # that had just answered; a second later it deploys.
                if attempt == DEPLOY_ATTEMPTS - 1:
                    raise
                time.sleep(1.0)


def serving(node: LocalNode) -> bool:
    """True if ``node`` answers that it serves (it is neither gone nor leaving)."""
    with grpc.insecure_channel(node.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2.0)
        except grpc.RpcError:
            return False
    return is_serving(reply)


def signal_node(node: LocalNode, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(node.pid, signum)


@pytest.fixture(scope="module")
def chaos_cluster(sample_exported, tmp_path_factory) -> Iterator[ChaosCluster]:
    sample = sample_exported("bert")
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=3, warmup=1)
    spec = cluster_spec()
    # One node a stage: on four equal nodes the planner would otherwise run BERT whole on each.
    made = plan(sample.model, layer_graph, spec, node_profiles(spec, profile, {}),
                Objective.THROUGHPUT, replicate=False)
    assert len(made.stages) >= 3, "the chaos plan needs a middle stage"
    local = LocalCluster(spec, tmp_path_factory.mktemp("chaos") / "state")
    with local:
        try:
            recovery = PlanRecovery(made)
            asyncio.run(recovery.prewarm(made, spec.names))
            reference = Reference(ProgramRunner(sample.model.program),
                                  random_inputs(made.inputs), [s.name for s in made.inputs])
            yield ChaosCluster(made, split(made, layer_graph), local, reference, recovery)
        finally:
            for node in local.nodes:  # a hung node must run again to stop
                signal_node(node, signal.SIGCONT)


@pytest.fixture
def chaos(chaos_cluster: ChaosCluster) -> ChaosCluster:
    chaos_cluster.heal()
    return chaos_cluster


async def run(
    setup: ChaosCluster, actions: dict[int, Callable[[Pipeline], Action | None]],
    gate: tuple[int, Callable[[Pipeline], bool]] | None = None,
) -> CheckedRun:
    """Run the requests; after ``k`` answers call ``actions[k](pipeline)``. With ``gate``
    ``(k, ready)``, requests past the ``k``-th answer wait until ``ready(pipeline)``."""

    async with await Pipeline.connect(setup.plan, window=IN_FLIGHT,
                                      recovery=setup.recovery) as pipeline:
        await pipeline.prepared()

        async def progress(answered: int) -> None:
            action = actions.pop(answered, None)
            if action is not None:
                waiting = action(pipeline)
                if waiting is not None:
                    await waiting
            if gate is not None and answered >= gate[0]:
                await wait_until(lambda: gate[1](pipeline))

        return await run_checked(pipeline, setup.reference, requests=REQUESTS,
                                 concurrency=IN_FLIGHT, progress=progress)


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT_S):
        while not condition():
            await asyncio.sleep(0.05)


def kill(setup: ChaosCluster, stage: int, signum: int = signal.SIGKILL):
    """An action: send ``signum`` to the node of ``stage`` in the current plan."""
    def act(pipeline: Pipeline) -> None:
        node = setup.stage_node(pipeline, stage)
        print(f"{signal.Signals(signum).name} {node.name} (stage {stage})")
        signal_node(node, signum)
    return act


def check(result: CheckedRun, replans: int) -> None:
    for replan in result.replans:
        print(f"re-plan ({replan['cause']}): {' '.join(replan['old_stages'])} -> "
              f"{' '.join(replan['new_stages'])}; detection {_s(replan['detection_s'])}, "
              f"recovery {_s(replan['recovery_s'])}, paused {replan['pause_s']:.2f} s, "
              f"moved {replan['moved_bytes']} B, replayed {replan['replayed']}")
    print(f"answered {result.answered}/{result.requests}, failed {result.failed}, "
          f"duplicates {result.duplicates}, mismatches {result.mismatches}, "
          f"late answers dropped {result.late_answers}")
    assert (result.answered, result.failed, result.duplicates, result.mismatches) == (
        REQUESTS, 0, 0, 0), result.errors
    assert len(result.replans) >= replans
    for replan in result.replans:
        if replan["detection_s"] is not None:
            assert replan["detection_s"] < DETECTION_BOUND_S


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _left_out(result: CheckedRun, name: str, replan: int = 0) -> bool:
    return all(not s.startswith(f"{name}[") for s in result.replans[replan]["new_stages"])


def test_kill_middle_stage_node(chaos: ChaosCluster) -> None:
    victim = chaos.plan.stages[1].node
    result = asyncio.run(run(chaos, {150: kill(chaos, 1)}))
    check(result, replans=1)
    assert _left_out(result, victim)


def test_kill_last_stage_node(chaos: ChaosCluster) -> None:
    victim = chaos.plan.stages[-1].node
    result = asyncio.run(run(chaos, {150: kill(chaos, -1)}))
    check(result, replans=1)
    assert _left_out(result, victim)


def test_kill_two_nodes_one_after_the_other(chaos: ChaosCluster) -> None:
    result = asyncio.run(run(chaos, {100: kill(chaos, 1), 300: kill(chaos, -1)}))
    check(result, replans=2)


def test_hung_node_then_continued(chaos: ChaosCluster) -> None:
    victim = chaos.node(chaos.plan.stages[1].node)
    result = asyncio.run(run(
        chaos,
        {150: kill(chaos, 1, signal.SIGSTOP),
         300: lambda pipeline: signal_node(victim, signal.SIGCONT)},
    ))
    check(result, replans=1)
    assert _left_out(result, victim.name)


def test_killed_node_restarted_is_used_again(chaos: ChaosCluster) -> None:
    victim = chaos.plan.stages[1].node

    def restart(pipeline: Pipeline) -> Awaitable[None]:
        async def later() -> None:
            await wait_until(lambda: victim not in {s.node for s in pipeline.plan.stages})
            await asyncio.to_thread(chaos.local.restart, victim)
        asyncio.get_running_loop().create_task(later())
        return None

    result = asyncio.run(run(
        chaos, {100: kill(chaos, 1), 101: restart},
        gate=(300, lambda pipeline: any("back" in r.cause for r in pipeline.replans)),
    ))
    check(result, replans=2)
    back = next(r for r in result.replans if "back" in r["cause"])
    assert any(s.startswith(f"{victim}[") for s in back["new_stages"])


def test_drained_node_loses_nothing(chaos: ChaosCluster) -> None:
    victim = chaos.plan.stages[1].node
    result = asyncio.run(run(chaos, {150: kill(chaos, 1, signal.SIGTERM)}))
    check(result, replans=1)
    assert "drained" in result.replans[0]["cause"]
    assert _left_out(result, victim)


def test_slowed_node_is_planned_around(chaos: ChaosCluster) -> None:
    victim = chaos.plan.stages[1].node

    def slow(pipeline: Pipeline) -> None:
        node = chaos.node(victim)
        print(f"{victim} (stage 1) made 4x slower (SIGUSR1 twice)")
        signal_node(node, signal.SIGUSR1)
        signal_node(node, signal.SIGUSR1)

    result = asyncio.run(run(
        chaos, {250: slow},
        gate=(450, lambda pipeline: any("drift" in r.cause for r in pipeline.replans)),
    ))
    check(result, replans=1)
    drift = next(r for r in result.replans if "drift" in r["cause"])
    assert victim in drift["cause"] and drift["predicted_gain"] > 0
    before = next(s for s in drift["old_stages"] if s.startswith(f"{victim}["))
    after = [s for s in drift["new_stages"] if s.startswith(f"{victim}[")]
    assert not after or _layers(after[0]) < _layers(before)


def test_degraded_link_is_planned_around(chaos: ChaosCluster) -> None:
    """The link out of the first stage is made so slow (a control call re-wires it) that
    it takes four times the plan's bottleneck per frame: its node measures that, and the
    pipeline moves the cut or the nodes so that link carries less or nothing."""
    first, second = chaos.plan.stages[0], chaos.plan.stages[1]
    hop = chaos.plan.links[1]
    slower = LinkEmulation(first.bytes_out / (LINK_SLOWDOWN * chaos.plan.bottleneck_s),
                           hop.latency_s)

    async def degrade() -> None:
        handle = GrpcWorkerHandle(first.address, first.node)
        try:  # a link that is slow before its baseline is taken is the baseline: wait for it
            async with asyncio.timeout(WAIT_S):
                while (await handle.describe()).outbound_link(second.node).link_frames < WINDOW:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.5 * POLL_S)  # the pipeline's drift watch polls meanwhile
            print(f"link {hop.src}->{hop.dst} slowed to {slower.bytes_per_s:.0f} B/s "
                  f"({first.bytes_out} B a frame)")
            await handle.wire(Wiring((Hop(second.address, second.node, link=slower),),
                                     inbound=link_emulation(chaos.plan.links[0], True)))
        finally:
            await handle.close()

    result = asyncio.run(run(
        chaos, {100: lambda pipeline: degrade()},
        gate=(450, lambda pipeline: any("drift" in r.cause for r in pipeline.replans)),
    ))
    check(result, replans=1)
    drift = next(r for r in result.replans if "drift" in r["cause"])
    assert f"{hop.src}->{hop.dst}" in drift["cause"] and drift["predicted_gain"] > 0
    assert drift["old_stages"] != drift["new_stages"]


def _layers(stage: str) -> int:
    start, end = stage[stage.index("[") + 1 : -1].split(",")
    return int(end) - int(start)
