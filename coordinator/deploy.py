"""Ship each stage of a plan to its node and wire the chain source -> stages -> sink."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from node.client import GrpcWorkerHandle, WorkerHandle
from node.link import NO_EMULATION, LinkEmulation, MediumUse
from node.security import client_security
from partition.cluster import MediumSpec
from partition.errors import EdgesplitError
from partition.plan import Link, Plan
from partition.profiler import ProgressCallback
from partition.split import StageArtifact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deployment:
    """What ``deploy`` left on the nodes: each stage's address and artifact hash."""

    plan_sha256: str
    addresses: tuple[str, ...]
    artifact_sha256: tuple[str, ...]
    emulated_links: bool

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Deployment | None:
        try:
            data = json.loads(path.read_text())
            return cls(data["plan_sha256"], tuple(data["addresses"]),
                       tuple(data["artifact_sha256"]), bool(data["emulated_links"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def plan_digest(plan: Plan) -> str:
    return hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()


def deployment_record_path(plan_path: str | Path) -> Path:
    """Where ``deploy`` records what it shipped: ``plan.json`` -> ``plan.deployed.json``."""
    path = Path(plan_path)
    return path.with_name(path.stem + ".deployed.json")


def link_emulation(link: Link, emulate: bool, media: Sequence[MediumSpec] = ()) -> LinkEmulation:
    """The emulation a worker applies for ``link`` (none on real networks or within a node),
    with the airtime it takes on each of ``media`` it crosses."""
    if not emulate or link.src == link.dst:
        return NO_EMULATION
    crossed = tuple(MediumUse(m.name, m.bytes_per_s, uses) for m in media
                    if (uses := m.uses(link.src, link.dst)))
    return LinkEmulation(link.bytes_per_s, link.latency_s, crossed)


async def deploy(
    plan: Plan,
    artifacts: list[StageArtifact],
    *,
    emulate_links: bool,
    progress: ProgressCallback | None = None,
    handles: dict[str, WorkerHandle] | None = None,
) -> Deployment:
    """Check every node answers, load each stage, then wire the chain (each node sends in
    its outbound link's encoding).

    ``progress(bytes_sent, total_bytes)`` follows the uploads. ``handles`` maps addresses to
    already-open handles (default: a gRPC handle per stage, closed afterwards).

    Raises
    ------
    NodeUnreachableError, NodeRejectedError
        If a node does not answer or refuses its stage.
    """
    owned = handles is None
    handles = handles or plan_handles(plan)
    try:
        nodes = [handles[s.address] for s in plan.stages]
        await asyncio.gather(*(node.describe() for node in nodes))
        total = sum(len(a.data) for a in artifacts)
        sent = [0] * len(artifacts)

        def on_bytes(index: int) -> ProgressCallback:
            def update(done: int, _total: int) -> None:
                sent[index] = done
                if progress:
                    progress(sum(sent), total)
            return update

        # One node at a time: a node times its stage as it loads it, and nodes that share a
        # machine (a simulated cluster) would otherwise slow each other's timing down.
        for k, (node, artifact) in enumerate(zip(nodes, artifacts, strict=True)):
            await node.load_stage(artifact.spec, artifact.data, on_bytes(k))
        for k in reversed(range(len(plan.stages))):  # downstream first: no frame finds a gap
            after = plan.stages[k + 1] if k + 1 < len(plan.stages) else None
            await nodes[k].wire(
                after.address if after else None,
                next_node=after.node if after else None,
                previous_node=plan.stages[k - 1].node if k > 0 else None,
                outbound=link_emulation(plan.links[k + 1], emulate_links, plan.media),
                inbound=(link_emulation(plan.links[0], emulate_links, plan.media) if k == 0
                         else NO_EMULATION),
                encoding=plan.links[k + 1].encoding,
            )
        log.info("deployed %d stage(s)", len(plan.stages))
    finally:
        if owned:
            await asyncio.gather(*(h.close() for h in handles.values()))
    return Deployment(
        plan_sha256=plan_digest(plan),
        addresses=tuple(s.address for s in plan.stages),
        artifact_sha256=tuple(a.spec.artifact_sha256 for a in artifacts),
        emulated_links=emulate_links,
    )


def plan_handles(plan: Plan) -> dict[str, GrpcWorkerHandle]:
    """A gRPC handle per stage's node, by address, with the plan's credentials."""
    security = client_security(plan.security)
    return {s.address: GrpcWorkerHandle(s.address, s.node, security) for s in plan.stages}


async def is_deployed(plan: Plan, record: Deployment | None) -> bool:
    """True if every node still runs the stage ``record`` says ``deploy`` gave it."""
    if record is None or record.plan_sha256 != plan_digest(plan):
        return False
    handles = list(plan_handles(plan).values())
    try:
        infos = await asyncio.gather(*(h.describe() for h in handles))
    except EdgesplitError:
        return False
    finally:
        await asyncio.gather(*(h.close() for h in handles))
    return all(
        info.stage is not None and info.stage.sha256 == sha
        for info, sha in zip(infos, record.artifact_sha256, strict=True)
    )
