"""`--profile-on-nodes`: real workers time the layers on their own (emulated) hardware."""

from __future__ import annotations

from pathlib import Path

from coordinator.cli import main
from coordinator.local_cluster import LocalCluster
from coordinator.ports import free_ports
from coordinator.remote_profile import profile_on_nodes
from partition.cluster import parse_cluster
from partition.layers import build_layer_graph


def test_nodes_profile_themselves_and_the_plan_uses_it(sample_exported, tmp_path: Path) -> None:
    sample = sample_exported("skip_dag")
    full, half, gone = free_ports(3)
    spec = {
        "nodes": [
            {"name": "full", "address": f"127.0.0.1:{full}", "memory": "1GiB"},
            {"name": "half", "address": f"127.0.0.1:{half}", "memory": "1GiB", "speed": 0.5},
            {"name": "gone", "address": f"127.0.0.1:{gone}", "memory": "1GiB"},
        ],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }
    cluster = parse_cluster(spec, "test")
    running = parse_cluster({**spec, "nodes": spec["nodes"][:2]}, "test")  # "gone" never starts
    layer_graph = build_layer_graph(sample.model.program)
    with LocalCluster(running, tmp_path / "state"):
        profiles = profile_on_nodes(sample.model, layer_graph, cluster, exclude=set(),
                                    repeats=10)
        assert set(profiles) == {"full", "half"}  # the unreachable node is skipped
        full, half = profiles["full"], profiles["half"]
        assert full.model_sha256 == half.model_sha256 == sample.model.sha256
        assert 1.3 < half.layer_sum_s / full.layer_sum_s < 3.5  # speed 0.5: about twice
        yaml = tmp_path / "nodes.yaml"
        yaml.write_text(
            "nodes:\n" + "".join(
                f"  - {{name: {n['name']}, address: '{n['address']}', memory: 1GiB}}\n"
                for n in spec["nodes"]
            ) + "links:\n  default: {bandwidth: 1Gbps, latency: 1ms}\n"
        )
        assert main(["plan", str(sample.path), "--nodes", str(yaml), "--profile-on-nodes",
                     "--repeats", "3", "-o", str(tmp_path / "plan.json")]) == 0
