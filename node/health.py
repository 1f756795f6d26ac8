"""The worker's standard gRPC health service (``grpc_health.v1``).

Two entries: the whole process (``""``), NOT_SERVING once it drains on SIGTERM, and the
stage service (:data:`~node.data_path.SERVICE`), SERVING only while a stage is loaded and
wired and the node is not draining. Standard tools (``grpc_health_probe``, load balancers)
understand both; the coordinator watches them to tell a dead node, a departing one and a
restarted one without its stage apart.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from node.data_path import SERVICE

STAGE_SERVICE = SERVICE.full_name
"""The health entry of the stage service (``edgesplit.v1.EdgeNode``)."""

OVERALL = health.OVERALL_HEALTH
"""The health entry of the whole process."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class NodeHealth:
    """What the node's health service reports, set from what the node is doing."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.draining = False
        self.ready = False

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set_ready(self, ready: bool) -> None:
        """A stage is loaded and wired (``True``), or not."""
        self.ready = ready
        await self._publish()

    async def drain(self) -> None:
        """Report NOT_SERVING for good: the node is leaving."""
        self.draining = True
        await self._publish()

    async def _publish(self) -> None:
        await self.servicer.set(OVERALL, _NOT_SERVING if self.draining else _SERVING)
        serving = self.ready and not self.draining
        await self.servicer.set(STAGE_SERVICE, _SERVING if serving else _NOT_SERVING)


def is_serving(response: health_pb2.HealthCheckResponse) -> bool:
    """True if a health answer says SERVING."""
    return response.status == _SERVING
