"""A worker device installs only edgesplit's core (`pip install edgesplit`): ``edge-node``
must profile, load, wire and serve stages of a transformers model with none of the
coordinator's or the sample models' packages importable.

The workers here run with a ``sitecustomize.py`` first on ``PYTHONPATH`` that makes those
packages fail to import, and records every attempt, so the test also fails if a worker merely
tried one (and fell back).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cluster_helpers import NodeProcess, spawn_node, stop_node, wait_listening
from torch.utils import _pytree as pytree

from coordinator.deploy import deploy
from coordinator.pipeline import Pipeline
from coordinator.ports import free_ports
from coordinator.remote_profile import profile_on_nodes
from node.client import GrpcWorkerHandle
from partition.cluster import parse_cluster
from partition.cost_builder import build_cost_model
from partition.layers import build_layer_graph
from partition.optimizer import Span, evaluate
from partition.plan import Objective
from partition.planning import plan_from_schedule
from partition.split import split

NOT_ON_A_WORKER = ("yaml", "rich", "matplotlib", "transformers")
REQUESTS = 8

BLOCKER = textwrap.dedent('''
    """Test harness: the packages named in $EDGESPLIT_TEST_MISSING are not installed here."""
    import os
    import sys
    from pathlib import Path

    _MISSING = set(os.environ["EDGESPLIT_TEST_MISSING"].split(","))
    _RECORD = Path(os.environ["EDGESPLIT_TEST_RECORDS"]) / f"{os.getpid()}.txt"
    _RECORD.touch()  # this process runs with the blocker


    class _Missing:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] not in _MISSING:
                return None
            with _RECORD.open("a") as record:
                record.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


    sys.meta_path.insert(0, _Missing())
''')

PROBE = textwrap.dedent('''
    import importlib, json, os, sys
    outcome = {}
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
            outcome[name] = "imported"
        except ImportError as err:
            outcome[name] = type(err).__name__
    print(json.dumps({"pid": os.getpid(), "imports": outcome}))
''')


@pytest.fixture
def worker_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a worker device: yaml, rich, matplotlib and transformers missing."""
    site = tmp_path / "worker-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    records = tmp_path / "blocked-imports"
    records.mkdir()
    path = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "EDGESPLIT_TEST_MISSING": ",".join(NOT_ON_A_WORKER),
        "EDGESPLIT_TEST_RECORDS": str(records),
    }


def blocked_imports(env: dict[str, str], pid: int) -> list[str]:
    """The imports of a missing package that process ``pid`` attempted."""
    record = Path(env["EDGESPLIT_TEST_RECORDS"]) / f"{pid}.txt"
    assert record.is_file(), f"process {pid} did not run with the import blocker"
    return record.read_text().split()


@pytest.fixture
def lean_nodes(tmp_path: Path, worker_env: dict[str, str]) -> Iterator[list[NodeProcess]]:
    """Two ``edge-node`` processes in :func:`worker_env`, stopped when the test ends."""
    nodes: list[NodeProcess] = []
    try:
        for name, port in zip(("camera", "gateway"), free_ports(2), strict=True):
            nodes.append(spawn_node(name, f"127.0.0.1:{port}", tmp_path / f"{name}.log",
                                    env=worker_env))
        for node in nodes:
            wait_listening(node)
        yield nodes
    finally:
        for node in nodes:
            stop_node(node)


def test_the_blocker_makes_the_packages_missing(worker_env: dict[str, str]) -> None:
    names = [*NOT_ON_A_WORKER, "yaml.constructor", "transformers.models.gpt2", "msgpack"]
    done = subprocess.run([sys.executable, "-c", PROBE, *names], env=worker_env,
                          capture_output=True, text=True, timeout=60, check=True)
    report = json.loads(done.stdout)
    assert report["imports"] == {
        **{name: "ModuleNotFoundError" for name in names[:-1]}, "msgpack": "imported"
    }
    # A submodule's import tries its package first, and fails there.
    assert set(blocked_imports(worker_env, report["pid"])) == set(NOT_ON_A_WORKER)


async def test_lean_workers_profile_and_serve_a_split_gpt2(
    lean_nodes: list[NodeProcess], worker_env: dict[str, str], sample_exported
) -> None:
    sample = sample_exported("gpt2")
    model = sample.model
    layer_graph = build_layer_graph(model.program)
    cluster = parse_cluster({
        "nodes": [{"name": n.name, "address": n.address, "memory": "1GiB"} for n in lean_nodes],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }, "two lean workers")

    # Profile: each worker loads the whole exported model and times its layers.
    profiles = await asyncio.to_thread(profile_on_nodes, model, layer_graph, cluster,
                                       exclude=set(), repeats=1, warmup=1)
    assert set(profiles) == {"camera", "gateway"}
    assert all(p.layer_sum_s > 0 for p in profiles.values())

    # LoadStage and Wire: the first half on the camera, the second on the gateway.
    cost = build_cost_model(layer_graph, cluster, profiles)
    half = layer_graph.num_layers // 2
    schedule = evaluate(cost, [Span(0, 0, half), Span(1, half, layer_graph.num_layers)])
    plan = plan_from_schedule(model, layer_graph, cluster, cost, schedule,
                              Objective.THROUGHPUT, exact=False, lower_bound_s=0.0)
    await deploy(plan, split(plan, layer_graph), emulate_links=False)

    # Submit and Results: requests of different tokens, each against the local model.
    vocab = sample.module.config.vocab_size
    generator = torch.Generator().manual_seed(3)
    batches = [
        (torch.randint(0, vocab, spec.shape, generator=generator),)
        for spec in [plan.inputs[0]] * REQUESTS
    ]
    async with await Pipeline.connect(plan, window=REQUESTS) as pipeline:
        answers = await pipeline.map(batches)
    for inputs, got in zip(batches, answers, strict=True):
        with torch.no_grad():
            expected = tuple(pytree.tree_leaves(sample.module(*inputs)))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Describe: both workers served every request.
    for node in lean_nodes:
        handle = GrpcWorkerHandle(node.address, node.name)
        try:
            info = await handle.describe()
        finally:
            await handle.close()
        assert info.stage is not None and info.requests_served == REQUESTS, info

    for node in lean_nodes:
        tried = blocked_imports(worker_env, node.process.pid)
        assert tried == [], f"{node.name} tried to import {tried}, which a worker may not have"


def test_coordinator_without_its_extra_says_what_to_install(worker_env: dict[str, str]) -> None:
    """A core-only install still has the ``coordinator`` script: it names the extra to add."""
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.cli", "status"],
        env=worker_env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "coordinator: error: rich is not installed; this command needs "
        "pip install 'edgesplit[coordinator]' (a worker device needs only edge-node)"
    ]
