"""Ship each stage of a plan to its nodes and wire the chain source -> stages -> sink.

A replicated stage's artifact is exported once and shipped to each of its nodes; every node
of a stage deals its output frames among the next stage's nodes by their shares, and
accepts frames from every node of the stage before.
"""

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
from node.messages import Hop, Wiring
from node.security import client_security
from partition.cluster import MediumSpec
from partition.compression import LinkEncoding
from partition.errors import EdgesplitError, PlanFormatError
from partition.plan import Link, Plan, Replica
from partition.profiler import ProgressCallback
from partition.split import StageArtifact

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deployment:
    """What ``deploy`` left on the nodes: each stage's nodes' addresses and artifact hashes
    (stage after stage, a stage's replicas in order)."""

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


def replicas(plan: Plan) -> list[tuple[int, Replica]]:
    """Every node running a stage of ``plan``: (stage index, replica), stage after stage."""
    return [(k, replica) for k, stage in enumerate(plan.stages) for replica in stage.replicas]


def hop_link(plan: Plan, k: int, src: str, dst: str) -> Link:
    """The link of hop ``k`` from ``src`` to ``dst``."""
    for link in plan.hop_links(k):
        if (link.src, link.dst) == (src, dst):
            return link
    raise PlanFormatError(f"plan has no link from {src!r} to {dst!r} in hop {k}; make the plan "
                          "again with `coordinator plan`")


def hop_encoding(plan: Plan, k: int, sender: str) -> LinkEncoding:
    """The encoding ``sender`` sends hop ``k``'s frames in (one per sender: a frame is
    encoded once, then dealt among the receivers)."""
    encodings = {link.encoding for link in plan.hop_links(k) if link.src == sender}
    if len(encodings) != 1:
        raise PlanFormatError(
            f"plan's links of hop {k} from {sender!r} have encodings "
            f"{sorted(e.value for e in encodings)}; a node sends one hop in one encoding, so "
            "make the plan again with `coordinator plan`")
    return encodings.pop()


def replica_wiring(plan: Plan, k: int, node: str, emulate: bool) -> Wiring:
    """How ``node``, one of stage ``k``'s nodes, is wired: to every node of stage ``k + 1``
    with its share (or to the sink), from every node of stage ``k - 1``, emulating its
    links when ``emulate``."""
    stages = plan.stages
    after = stages[k + 1].replicas if k + 1 < len(stages) else ()
    return Wiring(
        next_hops=tuple(Hop(r.address, r.node, r.share,
                            link_emulation(hop_link(plan, k + 1, node, r.node), emulate,
                                           plan.media))
                        for r in after),
        previous_nodes=stages[k - 1].nodes if k else (),
        outbound=(NO_EMULATION if after else
                  link_emulation(hop_link(plan, k + 1, node, plan.sink), emulate, plan.media)),
        inbound=(link_emulation(hop_link(plan, 0, plan.source, node), emulate, plan.media)
                 if k == 0 else NO_EMULATION),
        encoding=hop_encoding(plan, k + 1, node),
    )


async def deploy(
    plan: Plan,
    artifacts: list[StageArtifact],
    *,
    emulate_links: bool,
    progress: ProgressCallback | None = None,
    handles: dict[str, WorkerHandle] | None = None,
) -> Deployment:
    """Check every node answers, load each stage on each of its nodes, then wire the chain
    (each node sends in its outbound hop's encoding).

    ``progress(bytes_sent, total_bytes)`` follows the uploads. ``handles`` maps addresses to
    already-open handles (default: a gRPC handle per stage's node, closed afterwards).

    Raises
    ------
    NodeUnreachableError, NodeRejectedError
        If a node does not answer or refuses its stage.
    """
    owned = handles is None
    handles = handles or plan_handles(plan)
    try:
        placed = replicas(plan)
        wirings = {r.node: replica_wiring(plan, k, r.node, emulate_links) for k, r in placed}
        await asyncio.gather(*(handles[r.address].describe() for _, r in placed))
        total = sum(len(artifacts[k].data) for k, _ in placed)
        sent = [0] * len(placed)

        def on_bytes(index: int) -> ProgressCallback:
            def update(done: int, _total: int) -> None:
                sent[index] = done
                if progress:
                    progress(sum(sent), total)
            return update

        # One node at a time: a node times its stage as it loads it, and nodes that share a
        # machine (a simulated cluster) would otherwise slow each other's timing down.
        for i, (k, replica) in enumerate(placed):
            artifact = artifacts[k]
            await handles[replica.address].load_stage(artifact.spec, artifact.data, on_bytes(i))
        for _, replica in reversed(placed):  # downstream first: no frame finds a gap
            await handles[replica.address].wire(wirings[replica.node])
        log.info("deployed %d stage(s) on %d node(s)", len(plan.stages), len(placed))
    finally:
        if owned:
            await asyncio.gather(*(h.close() for h in handles.values()))
    return Deployment(
        plan_sha256=plan_digest(plan),
        addresses=tuple(r.address for _, r in placed),
        artifact_sha256=tuple(artifacts[k].spec.artifact_sha256 for k, _ in placed),
        emulated_links=emulate_links,
    )


def plan_handles(plan: Plan) -> dict[str, GrpcWorkerHandle]:
    """A gRPC handle per node running a stage, by address, with the plan's credentials."""
    security = client_security(plan.security)
    return {r.address: GrpcWorkerHandle(r.address, r.node, security) for _, r in replicas(plan)}


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
