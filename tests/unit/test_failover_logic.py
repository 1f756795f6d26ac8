"""Failover's plain parts: how answers count once, what plan.json carries for re-planning,
and re-planning over the nodes left."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from coordinator.drift import LINK_NOISE_S, SUSTAIN_POLLS, WINDOW, Drift, DriftWatch
from coordinator.ledger import Ledger, RequestFailedError
from coordinator.recovery import PlanRecovery
from node.client import Result
from node.messages import Failure, FailureCode
from partition.cluster import LinkSpec, parse_cluster
from partition.compression_choice import calibration_inputs
from partition.compression_planning import CompressionRequest, CompressMode
from partition.cost_builder import node_profiles
from partition.errors import EdgesplitError, NoFeasiblePlanError, PlanningError
from partition.layers import build_layer_graph
from partition.measured import Measured
from partition.plan import Objective, Plan
from partition.planning import plan
from partition.profiler import profile_layers
from partition.replan_inputs import read_replan_inputs
from partition.replanning import Replanner
from partition.spec import TensorSpec

OUT = TensorSpec("y", "float32", (1,))


def _failure(wire_id: int) -> Result:
    return Result(wire_id, failure=Failure(wire_id, FailureCode.STAGE_FAILED, "boom", "n1", 1))


async def test_first_answer_counts_and_late_ones_are_dropped() -> None:
    ledger = Ledger((OUT,))
    request = ledger.accept({})
    old = ledger.wire_id(request, 1.0)
    ledger.new_version()
    new = ledger.wire_id(request, 1.0)
    assert old != new
    assert ledger.deliver(Result(old, outputs={"y": torch.ones(1)})) is request  # old chain
    assert ledger.deliver(Result(new, outputs={"y": torch.zeros(1)})) is None  # the replay
    assert (await request.answer)[0].item() == 1.0
    assert ledger.late == 1
    assert ledger.deliver(Result(12345, outputs={"y": torch.zeros(1)})) is None  # not ours
    assert ledger.late == 1


async def test_a_failure_from_an_old_plan_version_does_not_answer() -> None:
    ledger = Ledger((OUT,))
    request = ledger.accept({})
    old = ledger.wire_id(request, 1.0)
    ledger.new_version()
    new = ledger.wire_id(request, 1.0)
    assert ledger.deliver(_failure(old)) is None  # a casualty of the switch
    assert not request.answer.done()
    assert ledger.deliver(_failure(new)) is request
    with pytest.raises(RequestFailedError, match="stage 1 on n1 failed the request: boom"):
        await request.answer


async def test_forgotten_requests_are_not_unanswered_and_fail_all_answers_the_rest() -> None:
    ledger = Ledger((OUT,))
    done, waiting = ledger.accept({}), ledger.accept({})
    ledger.deliver(Result(ledger.wire_id(done, 1.0), outputs={"y": torch.ones(1)}))
    ledger.forget(done)
    assert ledger.unanswered() == [waiting]
    ledger.fail_all(PlanningError("no plan fits"))
    with pytest.raises(PlanningError):
        await asyncio.wait_for(waiting.answer, 1)


async def test_a_lost_replica_s_requests_are_replayed_and_every_request_answered_once() -> None:
    """The last stage runs on b and d; d dies with request 0, b answered request 1 but its
    answer to request 2 is still on the way when the pipeline replays both unanswered ones
    (and only those) to b alone: each of the three is answered exactly once."""
    ledger = Ledger((OUT,))
    requests = [ledger.accept({}) for _ in range(3)]
    sent = [ledger.wire_id(r, 1.0) for r in requests]  # dealt: d, b, b
    assert ledger.deliver(Result(sent[1], outputs={"y": torch.ones(1)})) is requests[1]
    ledger.new_version()  # d left out: the replay goes under a new version
    replayed = ledger.unanswered()
    assert replayed == [requests[0], requests[2]]
    again = {r.number: ledger.wire_id(r, 1.0) for r in replayed}
    assert ledger.deliver(Result(sent[2], outputs={"y": torch.ones(1)})) is requests[2]  # late b
    assert ledger.deliver(Result(again[2], outputs={"y": torch.ones(1)})) is None  # its replay
    assert ledger.deliver(Result(again[0], outputs={"y": torch.ones(1)})) is requests[0]
    assert all(r.answer.done() for r in requests) and ledger.late == 1 and not ledger.strays


@pytest.fixture(scope="module")
def skip_dag_plan(sample_exported) -> tuple:
    sample = sample_exported("skip_dag")
    layer_graph = build_layer_graph(sample.model.program)
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=1, warmup=0)
    cluster = parse_cluster({
        "nodes": [{"name": f"n{i}", "address": f"127.0.0.1:{6000 + i}", "memory": "1GiB",
                   "speed": 0.05, "quantize": ("none", "int8", "int4")[i]} for i in range(3)],
        "links": {"default": {"bandwidth": "10Gbps", "latency": "0.01ms"},
                  "overrides": [{"from": "n0", "to": "n2", "bandwidth": "1Mbps"}]},
        "source": "n0", "sink": "n0",
    }, "test")
    made = plan(sample.model, layer_graph, cluster, node_profiles(cluster, profile, {}),
                Objective.THROUGHPUT)
    return sample, layer_graph, cluster, made


def test_plan_json_carries_the_cluster_and_profiles(skip_dag_plan) -> None:
    _, _, cluster, made = skip_dag_plan
    again = Plan.from_dict(json.loads(json.dumps(made.to_dict())))
    inputs = read_replan_inputs(again.replan)
    spec, profiles = inputs.cluster, inputs.profiles
    assert spec == cluster  # each node's quantize included
    assert set(profiles) == {"n0", "n1", "n2"}


def test_a_plan_file_without_replan_inputs_still_loads(skip_dag_plan) -> None:
    data = skip_dag_plan[3].to_dict()
    del data["replan"]
    assert Plan.from_dict(data).replan is None


def test_replanning_uses_only_the_nodes_left(skip_dag_plan) -> None:
    sample, layer_graph, _, made = skip_dag_plan
    replanner = Replanner(made, sample.model, layer_graph)
    used = {s.node for s in made.stages}
    for gone in used:
        left = replanner.replan({"n0", "n1", "n2"} - {gone})
        assert gone not in {s.node for s in left.stages}
        assert left.stages[0].start == 0 and left.stages[-1].end == layer_graph.num_layers
        assert left.replan == made.replan and left.objective is made.objective


def test_a_slower_node_gets_less_work(skip_dag_plan) -> None:
    sample, layer_graph, _, made = skip_dag_plan
    replanner = Replanner(made, sample.model, layer_graph)
    slow = made.stages[0].node
    before = replanner.price(made)
    slowed = Measured(slowdown={slow: 10.0})
    after = replanner.price(made, slowed)
    assert after.bottleneck_s > before.bottleneck_s
    moved = replanner.replan({"n0", "n1", "n2"}, slowed)
    assert replanner.price(moved, slowed).bottleneck_s < after.bottleneck_s


def test_a_slower_link_carries_less(skip_dag_plan) -> None:
    sample, layer_graph, _, made = skip_dag_plan
    replanner = Replanner(made, sample.model, layer_graph)
    hop = made.links[1]
    slower = made.stages[0].bytes_out / (10 * made.bottleneck_s)  # 10x the bottleneck a frame
    slowed = Measured(bandwidth={(hop.src, hop.dst): slower})
    _, cost = replanner.cost(None, slowed)
    src, dst = cost.node_names.index(hop.src), cost.node_names.index(hop.dst)
    assert cost.link_bytes_per_s[src, dst] == pytest.approx(slower)
    assert cost.link_bytes_per_s[dst, src] == pytest.approx(hop.bytes_per_s)  # one way only
    after = replanner.price(made, slowed)
    assert after.bottleneck_s > replanner.price(made).bottleneck_s
    moved = replanner.replan({"n0", "n1", "n2"}, slowed)
    assert replanner.price(moved, slowed).bottleneck_s < after.bottleneck_s


def test_slowdowns_measured_again_multiply_and_bandwidths_replace() -> None:
    first = Measured({"a": 2.0}, {("a", "b"): 3e6})
    again = first.updated({"a": 1.5, "c": 2.0}, {("b", "a"): 4e6, ("a", "b"): 1e6})
    assert again == Measured({"a": 3.0, "c": 2.0}, {("a", "b"): 1e6, ("b", "a"): 4e6})
    assert again.key() == Measured(dict(reversed(again.slowdown.items())), again.bandwidth).key()


def test_no_plan_fits_names_the_nodes_left(skip_dag_plan) -> None:
    sample, layer_graph, _, made = skip_dag_plan
    tiny = replace(made, replan={**made.replan, "cluster": {
        **made.replan["cluster"],
        "nodes": [{**n, "memory_bytes": 1} for n in made.replan["cluster"]["nodes"]]}})
    with pytest.raises(NoFeasiblePlanError, match=r"nodes left \(n1, n2\)"):
        Replanner(tiny, sample.model, layer_graph).replan({"n1", "n2"})
    with pytest.raises(PlanningError, match="carries no cluster spec"):
        Replanner(replace(made, replan=None), sample.model, layer_graph)


@pytest.fixture(scope="module")
def compressed_plan(skip_dag_plan, tmp_path_factory) -> tuple:
    """The skip DAG over slow links, planned with ``--compress auto`` on calibration inputs
    saved to a file."""
    sample, layer_graph, cluster, _ = skip_dag_plan
    slow = replace(cluster, default_link=LinkSpec(125_000.0, 1e-5), links={},
                   nodes=tuple(replace(n, quantize=None) for n in cluster.nodes))
    inputs = calibration_inputs(sample.model, 4)
    path = tmp_path_factory.mktemp("calibration") / "inputs.pt"
    torch.save([list(item) for item in inputs], path)
    request = CompressionRequest(CompressMode.AUTO, tuple(inputs), 5e-2,
                                 calibration_file=str(path))
    profile = profile_layers(layer_graph, sample.model.sha256, sample.model.example_inputs,
                             repeats=1, warmup=0)
    made = plan(sample.model, layer_graph, slow, node_profiles(slow, profile, {}),
                Objective.THROUGHPUT, request)
    again = Plan.from_dict(json.loads(json.dumps(made.to_dict())))
    return sample, layer_graph, again, inputs, path


def _encoded(made: Plan) -> list[str]:
    return [link.encoding.value for link in made.links if link.encoding.value != "raw"]


def test_a_compressed_plan_is_replanned_compressed_within_its_budget(compressed_plan) -> None:
    sample, layer_graph, made, inputs, path = compressed_plan
    assert _encoded(made) and made.accuracy is not None
    settings = read_replan_inputs(made.replan).compression
    assert settings is not None and settings.calibration_file == str(path)
    assert (settings.mode, settings.max_error, settings.calibration_count) == (
        CompressMode.AUTO, 5e-2, 4)
    read: list[str] = []

    def reader(where: str) -> list:
        read.append(where)
        return inputs

    replanner = Replanner(made, sample.model, layer_graph, reader)
    for gone in {s.node for s in made.stages}:
        left = replanner.replan({"n0", "n1", "n2"} - {gone})
        assert gone not in {s.node for s in left.stages}
        assert left.accuracy is not None and left.accuracy.max_rel_error <= 5e-2
        assert left.accuracy.inputs == 4
        if len(left.stages) > 1 or left.stages[0].node != "n0":
            assert _encoded(left), "a re-plan over slow links sends compressed again"
    assert read == [str(path)]  # measured once, on the first re-plan


def test_replanning_without_the_calibration_file_uses_random_inputs(
    compressed_plan, caplog
) -> None:
    sample, layer_graph, made, _, path = compressed_plan

    def unreadable(where: str) -> list:
        raise EdgesplitError(f"--calibration '{where}' does not exist")

    left = Replanner(made, sample.model, layer_graph, unreadable).replan({"n1", "n2"})
    assert left.accuracy is not None and left.accuracy.inputs == 4
    assert "re-plans measure compression on random inputs" in caplog.text


class _Reporting:
    """A node's ``describe`` as the drift watch reads it: counters and medians set by hand,
    with one outbound link (``link``) to ``next_node`` (``None``: the Results stream)."""

    def __init__(self, next_node: str | None) -> None:
        self.link = SimpleNamespace(node=next_node, link_frames=0, link_p50_seconds=0.001,
                                    link_bytes_per_s=1e7)
        self.info = SimpleNamespace(requests_served=0, p50_stage_seconds=0.010,
                                    outbound_links=[self.link])

    async def describe(self) -> SimpleNamespace:
        return self.info


async def test_drift_is_a_sustained_change_past_the_baseline(skip_dag_plan) -> None:
    made = skip_dag_plan[3]
    after = {s.node: made.stages[k + 1].node if k + 1 < len(made.stages) else None
             for k, s in enumerate(made.stages)}
    handles = {name: _Reporting(after.get(name)) for name in made.addresses}
    watch = DriftWatch()

    async def poll(served: int) -> Drift:
        for handle in handles.values():
            handle.info.requests_served = handle.link.link_frames = served
        return await watch.poll(made, handles)

    assert not await poll(WINDOW - 1)  # not a full window since the stage was loaded
    assert not await poll(WINDOW)  # the baselines
    first, hop = made.stages[0].node, made.links[1]
    handles[first].info.p50_stage_seconds = 0.030  # 3x slower
    handles[first].link.link_p50_seconds = 0.0015  # 1.5x, but within the noise floor
    found = [await poll(WINDOW + k) for k in range(SUSTAIN_POLLS)]
    assert [bool(d) for d in found] == [False] * (SUSTAIN_POLLS - 1) + [True]
    assert found[-1].nodes == {first: pytest.approx(3.0)} and not found[-1].links
    slow_s, frame_bytes = 0.001 + 2 * LINK_NOISE_S, 1e4
    handles[first].link.link_p50_seconds = slow_s
    handles[first].link.link_bytes_per_s = frame_bytes / slow_s
    found = [await poll(2 * WINDOW + k) for k in range(SUSTAIN_POLLS)]
    assert found[-1].links == {(hop.src, hop.dst): pytest.approx(slow_s / 0.001)}
    # the link's busy time per frame holds no latency: the bandwidth is bytes over it
    assert found[-1].bandwidth == {(hop.src, hop.dst): pytest.approx(frame_bytes / slow_s)}
    watch.forget({first})  # re-measured after a switch: the slow figures are the new baseline
    assert not await poll(3 * WINDOW)
    assert not any([await poll(4 * WINDOW + k) for k in range(SUSTAIN_POLLS)])



async def test_a_closed_recovery_takes_no_more_work_and_its_thread_ends() -> None:
    recovery = PlanRecovery(SimpleNamespace())  # type: ignore[arg-type]  # never planned with
    worker = await recovery._run(threading.current_thread)
    assert worker is not threading.current_thread()
    recovery.close()
    await asyncio.to_thread(worker.join, 10.0)
    assert not worker.is_alive()
    with pytest.raises(RuntimeError, match="shutdown"):
        await recovery._run(threading.current_thread)
