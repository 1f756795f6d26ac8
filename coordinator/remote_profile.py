"""``--profile-on-nodes``: each reachable node times the model's layers on its own hardware
and says how much memory its worker takes before any stage."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import torch
from torch.utils import _pytree as pytree

from node.client import GrpcWorkerHandle
from node.errors import NodeUnreachableError
from node.profiling import ProfileOptions
from node.security import Security, client_security
from partition.artifact import program_to_bytes
from partition.cluster import ClusterSpec
from partition.layers import LayerGraph
from partition.loader import LoadedModel
from partition.profiler import Profile

log = logging.getLogger(__name__)


def profile_on_nodes(
    model: LoadedModel,
    layer_graph: LayerGraph,
    cluster: ClusterSpec,
    *,
    exclude: set[str],
    repeats: int,
    warmup: int = 3,
) -> dict[str, Profile]:
    """Profiles measured on every reachable node not in ``exclude``, one node at a time (so
    nodes sharing a machine do not disturb each other). Unreachable nodes are skipped with
    a warning; the planner then scales this machine's profile by their ``speed``."""
    # The exported program itself, so a model given as a pickle is profiled as exported.
    data = program_to_bytes(_with_flat_outputs(model.program))
    security = client_security(cluster.security)
    measured: dict[str, Profile] = {}
    for node in cluster.nodes:
        if node.name in exclude:
            continue
        options = ProfileOptions(layer_graph.granularity, node.threads or 1, repeats, warmup)
        try:
            profile = Profile.from_dict(asyncio.run(_profile(node.address, node.name, data,
                                                             options, security)))
        except NodeUnreachableError as err:
            log.warning("%s; planning it with its configured speed instead", err)
            continue
        # The node hashed the bytes it was sent: the program exported from this model file.
        profile = replace(profile, model_sha256=model.sha256)
        profile.check_matches(model.sha256, layer_graph, f"from node {node.name!r}")
        measured[node.name] = profile
    return measured


def worker_overheads(cluster: ClusterSpec) -> dict[str, int]:
    """Each reachable node's worker's resident memory before any stage, as it reports it
    (``Describe``). Unreachable nodes are left out with a warning (the planner then takes
    :data:`~partition.cluster.WORKER_OVERHEAD_BYTES` for them)."""
    return asyncio.run(_overheads(cluster, client_security(cluster.security)))


async def _overheads(cluster: ClusterSpec, security: Security | None) -> dict[str, int]:
    async def one(name: str, address: str) -> tuple[str, int]:
        handle = GrpcWorkerHandle(address, name, security)
        try:
            return name, (await handle.describe()).resident_overhead_bytes
        except NodeUnreachableError as err:
            log.warning("%s; planning its worker's memory with the default", err)
            return name, 0
        finally:
            await handle.close()

    reported = await asyncio.gather(*(one(n.name, n.address) for n in cluster.nodes))
    return {name: overhead for name, overhead in reported if overhead}


def _with_flat_outputs(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` returning a flat tuple of its output tensors, so that a worker loads it
    without the model's output classes (a ``transformers`` ModelOutput needs transformers,
    which a worker device does not install)."""
    entries = [
        entry if entry.signature is None else replace(entry, signature=replace(
            entry.signature,
            out_spec=pytree.tree_structure((0,) * entry.signature.out_spec.num_leaves),
        ))
        for entry in program.module_call_graph
    ]
    return torch.export.ExportedProgram(
        root=program.graph_module, graph=program.graph, graph_signature=program.graph_signature,
        state_dict=program.state_dict, range_constraints=program.range_constraints,
        module_call_graph=entries, example_inputs=program.example_inputs,
        constants=program.constants, verifiers=program.verifiers,
    )


async def _profile(
    address: str, name: str, data: bytes, options: ProfileOptions, security: Security | None
) -> dict:
    handle = GrpcWorkerHandle(address, name, security)
    try:
        return await handle.profile(data, options)
    finally:
        await handle.close()
