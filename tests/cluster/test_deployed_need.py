"""The CPU a deployed plan needs from the host of a simulated cluster, from what its real
workers timed; and ``bench`` offering less when the host could not carry the plan."""

from __future__ import annotations

import asyncio

import pytest

import coordinator.host_budget as host_budget
from coordinator.bench import measure, random_inputs
from coordinator.bench_command import offered_rate, prediction_table
from coordinator.deploy import deploy, plan_handles
from coordinator.host_budget import calibrated_stage_seconds, deployed_need, host_need
from coordinator.isolation import host_cores


async def describe_all(plan) -> list:
    handles = plan_handles(plan)
    try:
        return [await handles[s.address].describe() for s in plan.stages]
    finally:
        await asyncio.gather(*(h.close() for h in handles.values()))


async def test_the_need_counts_each_stage_as_its_node_timed_it(three_stages) -> None:
    parts = three_stages("vit")
    await deploy(parts.plan, parts.artifacts, emulate_links=False)
    infos = await describe_all(parts.plan)
    seconds = await calibrated_stage_seconds(parts.plan)
    assert seconds == [info.stage.calibrated_seconds for info in infos]
    assert all(s > 0 for s in seconds)
    need = await deployed_need(parts.plan)
    frames = host_budget.measure_frame_cost()
    assert need.cores == pytest.approx(host_need(parts.plan, seconds, frames, host_cores()).cores)
    assert need.rate_per_s == parts.plan.throughput_per_s


def test_bench_offers_fewer_requests_when_the_host_could_not_carry_them(
    three_stages, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parts = three_stages("vit")
    plan = parts.plan
    asyncio.run(deploy(plan, parts.artifacts, emulate_links=False))
    need = asyncio.run(deployed_need(plan))
    # A host whose safe share is half what the plan needs: bench must offer half the rate.
    monkeypatch.setattr(host_budget, "HOST_SHARE", need.cores / 2 / need.host_cores)
    rate = offered_rate(plan)
    assert rate == pytest.approx(plan.throughput_per_s / 2, rel=0.1)
    assert "offered load lowered to" in capsys.readouterr().out
    requests = 12
    result = asyncio.run(measure(plan, random_inputs(plan.inputs), requests=requests,
                                 concurrency=4, latency_requests=2, rate_per_s=rate))
    assert result.throughput_per_s <= rate * requests / (requests - 1) * 1.01
    assert result.predicted(plan)[0] == rate
    rows = {row[0]: row for row in _rows(prediction_table(plan, result))}
    assert rows["throughput req/s"][2] == f"{rate:.1f}"


def _rows(table) -> list[list[str]]:
    columns = [list(column.cells) for column in table.columns]
    return [list(row) for row in zip(*columns, strict=True)]
