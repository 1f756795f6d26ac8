"""The real CPU a simulated cluster's plan needs from the machine hosting it, and fitting it
under a safe share of the host's cores.

An emulated node computes its stage for real before it sleeps (or computes under a CPU
quota), so at a plan's predicted throughput ``R`` the host spends, every second,
``R x (sum of the stages' real times + sum of the frames' costs)`` of CPU time: each stage
once per request on this host (a replicated stage's replicas share its requests), each
hop's frame once per request, encoded, carried by gRPC and decoded. Above
:data:`~coordinator.isolation.HOST_SHARE` of the cores the workers and the client queue for
CPU and the figures measure the host, not the plan. Two ways out, both said in one line:
the benchmarks stretch every emulated speed by one factor (:func:`fit_speeds`, planned with,
so predictions match), and ``coordinator bench`` offers fewer requests a second
(:func:`safe_rate`).
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import torch

from coordinator.deploy import plan_handles, replicas
from coordinator.isolation import HOST_SHARE, host_cores, with_stretched_speeds
from node.codec import decode_frame, encode_frame
from node.data_path import read_submitted_frame
from partition.cluster import ClusterSpec
from partition.plan import Plan

FRAME_SIZES = (4 << 10, 1 << 20)
"""Frame sizes :func:`measure_frame_cost` times, bytes: a small and a large tensor."""
FRAMES_TIMED = 40
"""Frames :func:`measure_frame_cost` sends of each size."""
_CARRY = "/edgesplit.v1.HostBudget/Carry"


@dataclass(frozen=True)
class FrameCost:
    """CPU seconds this host spends on one frame of ``n`` bytes from encoding to decoding,
    both gRPC ends included: ``fixed_s + per_byte_s * n``."""

    fixed_s: float
    per_byte_s: float

    def __call__(self, nbytes: int) -> float:
        return self.fixed_s + self.per_byte_s * nbytes

    def scaled(self, factor: float) -> FrameCost:
        """This cost ``factor`` times over."""
        return FrameCost(self.fixed_s * factor, self.per_byte_s * factor)


@dataclass(frozen=True)
class HostNeed:
    """The cores a plan needs from this host at ``rate_per_s``, and the host's cores."""

    rate_per_s: float
    cores: float
    host_cores: int

    @property
    def allowed(self) -> float:
        """The cores the plan may use: :data:`HOST_SHARE` of the host's."""
        return HOST_SHARE * self.host_cores

    @property
    def fits(self) -> bool:
        return self.cores <= self.allowed * (1 + 1e-6)

    def describe(self) -> str:
        return (f"at {self.rate_per_s:.1f} req/s the plan needs {self.cores:.2f} of this "
                f"host's {self.host_cores} cores ({HOST_SHARE:.0%} is {self.allowed:.2f})")


@functools.cache
def measure_frame_cost() -> FrameCost:
    """Time frames through a loopback gRPC stream in this process, as the data path carries
    them (``encode_frame``, then ``read_frame`` and decoding on the other end): CPU time of
    both ends per frame, for two sizes, fitted to a line. Measured once per process."""
    costs = [asyncio.run(_cpu_per_frame(size)) for size in FRAME_SIZES]
    per_byte = max(0.0, (costs[1] - costs[0]) / (FRAME_SIZES[1] - FRAME_SIZES[0]))
    return FrameCost(max(0.0, costs[0] - per_byte * FRAME_SIZES[0]), per_byte)


async def _cpu_per_frame(size: int) -> float:
    """CPU seconds of this process per frame of ``size`` bytes sent and decoded."""

    async def carry(frames, _context):  # the receiving end decodes what it is sent
        async for frame in frames:
            decode_frame(frame.header, frame.payload)
            yield b""

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        carry, request_deserializer=read_submitted_frame, response_serializer=bytes)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "edgesplit.v1.HostBudget", {"Carry": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tensor = {"x": torch.zeros(size // 4, dtype=torch.float32)}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(_CARRY, request_serializer=None,
                                         response_deserializer=None)()
            await call.write(encode_frame(0, tensor))  # warm up
            await call.read()
            started = time.process_time()
            for index in range(FRAMES_TIMED):
                await call.write(encode_frame(index, tensor))
                await call.read()
            spent = time.process_time() - started
            await call.done_writing()
            await call.code()  # the call ends before the channel and the server do
    finally:
        await server.stop(1.0)  # the call has ended: no error for gRPC to log
    return spent / FRAMES_TIMED


def hop_bytes(plan: Plan) -> list[int]:
    """The bytes of each hop's frame: the inputs, each stage's outputs (raw tensors)."""
    return [plan.stages[0].bytes_in, *(stage.bytes_out for stage in plan.stages)]


def host_need(plan: Plan, stage_seconds: Sequence[float], frame_cost: FrameCost,
              host_cores: int, rate_per_s: float | None = None) -> HostNeed:
    """The cores ``plan`` needs from this host at ``rate_per_s`` (default: its predicted
    throughput), its stages taking ``stage_seconds`` of this host's CPU per request (0 for a
    stage on another machine)."""
    rate = plan.throughput_per_s if rate_per_s is None else rate_per_s
    return HostNeed(rate, rate * cpu_per_request(plan, stage_seconds, frame_cost), host_cores)


def cpu_per_request(plan: Plan, stage_seconds: Sequence[float], frame_cost: FrameCost) -> float:
    """This host's CPU seconds per request of ``plan``: its stages' and its hops' frames'."""
    return sum(stage_seconds) + sum(frame_cost(n) for n in hop_bytes(plan))


async def deployed_need(plan: Plan) -> HostNeed:
    """The cores deployed ``plan`` needs from this host at its predicted throughput: its
    stages' times as their nodes calibrated them, and frames as this host carries them."""
    seconds = await calibrated_stage_seconds(plan)
    return host_need(plan, seconds, await asyncio.to_thread(measure_frame_cost), host_cores())


async def calibrated_stage_seconds(plan: Plan) -> list[float]:
    """Each stage's real compute time per request on this host, as its nodes timed it when
    it loaded (one at a time, so with the others idle): a replicated stage's replicas
    weighted by their shares, and 0 for a replica on another machine."""
    handles = plan_handles(plan)
    try:
        infos = {r.node: info for (_, r), info in zip(
            replicas(plan), await asyncio.gather(*(handles[r.address].describe()
                                                    for _, r in replicas(plan))), strict=True)}
    finally:
        await asyncio.gather(*(h.close() for h in handles.values()))
    here = socket.gethostname()
    return [sum(r.share * infos[r.node].stage.calibrated_seconds for r in stage.replicas
                if infos[r.node].hostname == here and infos[r.node].stage is not None)
            for stage in plan.stages]


def fit_speeds(
    cluster: ClusterSpec, plans_for: Callable[[ClusterSpec], list[Plan]],
    stage_seconds: Callable[[Plan], Sequence[float]], frame_cost: FrameCost, host_cores: int,
    rounds: int = 8,
) -> tuple[ClusterSpec, float, HostNeed]:
    """``cluster`` with every speed stretched by the one factor that lets the neediest of
    ``plans_for(cluster)`` run at its predicted throughput within the host's safe share; the
    factor (1 if none was needed) and that plan's need at it.

    Plans are made again at each stretch: a slower cluster may be planned otherwise, and
    links do not slow down, so one stretch is not always enough.
    """
    stretch, fitted = 1.0, cluster
    for _ in range(rounds):
        need = max((host_need(p, stage_seconds(p), frame_cost, host_cores)
                    for p in plans_for(fitted)), key=lambda n: n.cores,
                   default=HostNeed(0.0, 0.0, host_cores))  # no plan fits: nothing runs
        if need.fits:
            break
        stretch *= need.allowed / need.cores
        fitted = with_stretched_speeds(cluster, stretch)
    return fitted, stretch, need


def safe_rate(need: HostNeed) -> float | None:
    """The requests a second that keep ``need`` within the host's safe share, or ``None``
    if the predicted rate already does."""
    return None if need.fits else need.rate_per_s * need.allowed / need.cores
