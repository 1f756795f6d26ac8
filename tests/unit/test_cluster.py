"""nodes.yaml: the examples load, and every mistake is one line naming the path and value."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from partition.cluster import (
    WORKER_OVERHEAD_BYTES,
    LinkSpec,
    MediumSpec,
    cost_arrays,
    load_cluster,
    memory_for_stages,
    with_default_quantize,
)
from partition.errors import ClusterSpecError
from partition.quantize import WeightFormat

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GOOD = """\
nodes:
  - name: camera
    address: 127.0.0.1:50051
    memory: 512MiB
    speed: 0.25
    threads: 1
    quantize: int8
  - {name: gateway, address: "localhost:50052", memory: 1GiB}
  - {name: box, address: "[::1]:50053", memory: 4GB}
links:
  default: {bandwidth: 100Mbps, latency: 2ms}
  overrides:
    - {from: camera, to: gateway, bandwidth: 8Mbps, latency: 10ms}
    - {from: gateway, to: camera, bandwidth: 4Mbps}
    - {from: box, to: gateway, latency: 1ms}
sink: box
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nodes.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_full_spec(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, GOOD))
    assert cluster.names == ("camera", "gateway", "box")
    camera = cluster.node("camera")
    assert (camera.memory_bytes, camera.speed, camera.threads) == (512 * 1024**2, 0.25, 1)
    assert cluster.node("gateway").speed is None and cluster.node("gateway").threads is None
    assert camera.quantize is WeightFormat.INT8 and cluster.node("gateway").quantize is None
    assert cluster.source == "camera" and cluster.sink == "box"
    assert cluster.link("camera", "gateway") == LinkSpec(1e6, 0.01)
    assert cluster.link("gateway", "camera") == LinkSpec(0.5e6, 0.002)  # bandwidth only
    assert cluster.link("gateway", "box") == LinkSpec(12.5e6, 0.001)  # symmetric
    assert cluster.link("camera", "box") == LinkSpec(12.5e6, 0.002)  # default
    assert cluster.link("box", "box") == LinkSpec(math.inf, 0.0)
    with pytest.raises(KeyError):
        cluster.node("phone")


def test_a_nodes_own_quantize_overrides_the_default(tmp_path: Path) -> None:
    cluster = with_default_quantize(load_cluster(write(tmp_path, GOOD)), WeightFormat.INT4)
    assert [node.quantize for node in cluster.nodes] == [
        WeightFormat.INT8, WeightFormat.INT4, WeightFormat.INT4
    ]


def test_cost_arrays(tmp_path: Path) -> None:
    arrays = cost_arrays(load_cluster(write(tmp_path, GOOD)))
    assert arrays.node_names == ("camera", "gateway", "box")
    assert arrays.node_memory_bytes.tolist() == [512 * 1024**2, 1024**3, 4 * 10**9]
    assert np.isinf(np.diag(arrays.link_bytes_per_s)).all()
    assert (np.diag(arrays.link_latency_s) == 0).all()
    assert arrays.link_bytes_per_s[0, 1] == 1e6 and arrays.link_bytes_per_s[1, 0] == 0.5e6
    assert (arrays.source, arrays.sink) == (0, 2)


@pytest.mark.parametrize("name", ["homogeneous", "heterogeneous", "memory-tight", "shared-wifi"])
def test_examples_load(name: str) -> None:
    cluster = load_cluster(EXAMPLES / f"cluster-{name}.yaml")
    assert len(cluster.nodes) >= 3
    assert all(node.speed is None or 0 < node.speed <= 1 for node in cluster.nodes)
    cost_arrays(cluster)


def test_minimal_spec_defaults_source_and_sink(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, "nodes: [{name: a, address: 'h:1', memory: 1}]"))
    assert (cluster.source, cluster.sink, cluster.default_link) == ("a", "a", None)


NODE_A = "  - {name: a, address: 'h:1', memory: 1GiB}\n"
NODE_B = "  - {name: b, address: 'h:2', memory: 1GiB}\n"
LINKS = "links:\n  default: {bandwidth: 1Gbps, latency: 1ms}\n"
TWO = "nodes:\n" + NODE_A + NODE_B + LINKS


def test_media(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, GOOD + "media:\n"
                                 "  - {name: wifi, bandwidth: 20Mbps, nodes: [camera, gateway]}\n"))
    wifi = MediumSpec("wifi", 2.5e6, ("camera", "gateway"))
    assert cluster.media == (wifi,)
    # station -> access point -> station: twice; a station to a wired node: once
    assert [wifi.uses(a, b) for a, b in [("camera", "gateway"), ("gateway", "box"),
                                         ("box", "camera"), ("camera", "camera")]] == [2, 1, 1, 0]
    assert load_cluster(write(tmp_path, GOOD)).media == ()


@pytest.mark.parametrize("text, message", [
    # unknown fields, at every level
    ("nodes:\n" + NODE_A + "colour: red\n", "colour: unknown field 'colour'"),
    ("nodes:\n  - {name: a, address: 'h:1', memory: 1GiB, mem: 2GiB}\n",
     "nodes[0].mem: unknown field 'mem'"),
    ("nodes:\n" + NODE_A + "links: {defaults: {bandwidth: 1Gbps}}\n",
     "links.defaults: unknown field 'defaults'"),
    ("nodes:\n" + NODE_A + "links: {default: {bandwidth: 1Gbps, latency: 0, jitter: 1ms}}\n",
     "links.default.jitter: unknown field 'jitter'"),
    ("nodes:\n" + NODE_A + NODE_B + LINKS +
     "  overrides: [{from: a, to: b, bandwith: 1Mbps}]\n",
     "links.overrides[0].bandwith: unknown field 'bandwith'"),
    ("nodes:\n  - {name: a, address: 'h:1', memory: 1GiB, quantize: int3}\n",
     "nodes[0].quantize: 'int3' is not a weight format (one of: none, int8, int4)"),
    ("nodes:\n  - {name: a, address: 'h:1', memory: 1GiB, quantize: 8}\n",
     "nodes[0].quantize: 8 is not a weight format (one of: none, int8, int4)"),
    # bad units
    ("nodes:\n" + NODE_A + "  - {name: b, address: 'h:2', memory: 2 GiBs}\n",
     "nodes[1].memory: '2 GiBs' is not a size (examples: 512MiB, 2GiB, 4GB)"),
    ("nodes:\n" + NODE_A + "links: {default: {bandwidth: 100, latency: 1ms}}\n",
     "links.default.bandwidth: 100 is not a bandwidth"),
    ("nodes:\n" + NODE_A + "links: {default: {bandwidth: 1Gbps, latency: 1 hour}}\n",
     "links.default.latency: '1 hour' is not a duration"),
    # unknown nodes
    ("nodes:\n" + NODE_A + NODE_B + LINKS + "  overrides: [{from: a, to: c, bandwidth: 1Mbps}]\n",
     "links.overrides[0].to: 'c' is not a node (nodes: a, b)"),
    ("nodes:\n" + NODE_A + "source: phone\n", "source: 'phone' is not a node (nodes: a)"),
    ("nodes:\n" + NODE_A + "sink: phone\n", "sink: 'phone' is not a node (nodes: a)"),
    # duplicates and self links
    ("nodes:\n" + NODE_A + NODE_A, "nodes[1].name: 'a' is used by nodes[0] already"),
    ("nodes:\n" + NODE_A + NODE_B + LINKS + "  overrides:\n"
     "    - {from: a, to: b, bandwidth: 1Mbps}\n    - {from: a, to: b, bandwidth: 2Mbps}\n",
     "links.overrides[1]: the link a -> b is given twice"),
    ("nodes:\n" + NODE_A + NODE_B + LINKS + "  overrides: [{from: a, to: a, bandwidth: 1Mbps}]\n",
     "links.overrides[0].to: 'a' is the 'from' node too"),
    # missing fields
    ("nodes:\n  - {address: 'h:1', memory: 1GiB}\n", "nodes[0]: missing field 'name'"),
    ("nodes:\n  - {name: a, memory: 1GiB}\n", "nodes[0]: missing field 'address'"),
    ("nodes:\n  - {name: a, address: 'h:1'}\n", "nodes[0]: missing field 'memory'"),
    ("nodes:\n" + NODE_A + "links: {default: {bandwidth: 1Gbps}}\n",
     "links.default: missing field 'latency'"),
    ("nodes:\n" + NODE_A + NODE_B, "links.default: missing, and the link a -> b is not in"),
    ("nodes:\n" + NODE_A + NODE_B + "links: {overrides: [{from: a, to: b, bandwidth: 1Mbps}]}\n",
     "links.overrides[0]: missing field 'latency'"),
    # malformed values
    ("nodes:\n  - {name: a, address: 'h', memory: 1GiB}\n",
     "nodes[0].address: 'h' is not host:port (example: 127.0.0.1:50051)"),
    ("nodes:\n  - {name: a, address: 'h:99999', memory: 1GiB}\n",
     "nodes[0].address: 'h:99999' is not host:port"),
    ("nodes:\n  - {name: a, address: 'h:1', memory: 0}\n", "nodes[0].memory: 0 must be positive"),
    ("nodes:\n  - {name: a, address: 'h:1', memory: -1GiB}\n",
     "nodes[0].memory: '-1GiB' must be positive"),
    ("nodes:\n  - {name: a, address: 'h:1', memory: 1GiB, speed: 0}\n",
     "nodes[0].speed: 0 is not a positive number"),
    ("nodes:\n  - {name: a, address: 'h:1', memory: 1GiB, speed: fast}\n",
     "nodes[0].speed: 'fast' is not a positive number"),
    ("nodes:\n  - {name: a, address: 'h:1', memory: 1GiB, threads: 0}\n",
     "nodes[0].threads: 0 is not a positive integer"),
    ("nodes:\n  - {name: a, address: 'h:1', memory: 1GiB, threads: 1.5}\n",
     "nodes[0].threads: 1.5 is not a positive integer"),
    ("nodes:\n  - {name: 3, address: 'h:1', memory: 1GiB}\n", "nodes[0].name: 3 is not a name"),
    ("nodes:\n" + NODE_A + "links: {default: {bandwidth: 0Mbps, latency: 1ms}}\n",
     "links.default.bandwidth: '0Mbps' must be positive"),
    ("nodes:\n" + NODE_A + "links: {default: {bandwidth: -5Mbps, latency: 1ms}}\n",
     "links.default.bandwidth: '-5Mbps' must be positive"),
    ("nodes:\n" + NODE_A + "links: {default: {bandwidth: 5Mbps, latency: -1ms}}\n",
     "links.default.latency: '-1ms' must not be negative"),
    ("nodes:\n" + NODE_A + "links: [1, 2]\n", "links: [1, 2] is not a mapping"),
    ("nodes:\n" + NODE_A + LINKS + "  overrides: {from: a}\n",
     "links.overrides: {'from': 'a'} is not a list of links"),
    ("nodes:\n  - just-a-name\n", "nodes[0]: 'just-a-name' is not a mapping"),
    # media
    (TWO + "media: {name: wifi}\n", "media: {'name': 'wifi'} is not a list of media"),
    (TWO + "media: [{name: wifi, bandwidth: 1Mbps}]\n", "media[0]: missing field 'nodes'"),
    (TWO + "media: [{bandwidth: 1Mbps, nodes: [a]}]\n", "media[0]: missing field 'name'"),
    (TWO + "media: [{name: wifi, nodes: [a]}]\n", "media[0]: missing field 'bandwidth'"),
    (TWO + "media: [{name: wifi, bandwidth: 1Mbps, nodes: [a], band: 5GHz}]\n",
     "media[0].band: unknown field 'band'"),
    (TWO + "media: [{name: wifi, bandwidth: 1Mbps, nodes: [a, c]}]\n",
     "media[0].nodes[1]: 'c' is not a node (nodes: a, b)"),
    (TWO + "media: [{name: wifi, bandwidth: 1Mbps, nodes: []}]\n",
     "media[0].nodes: [] is not a non-empty list of node names"),
    (TWO + "media: [{name: wifi, bandwidth: 0Mbps, nodes: [a]}]\n",
     "media[0].bandwidth: '0Mbps' must be positive and finite"),
    (TWO + "media: [{name: wifi, bandwidth: 10, nodes: [a]}]\n",
     "media[0].bandwidth: 10 is not a bandwidth"),
    (TWO + "media: [{name: '', bandwidth: 1Mbps, nodes: [a]}]\n",
     "media[0].name: '' is not a name"),
    (TWO + "media:\n  - {name: wifi, bandwidth: 1Mbps, nodes: [a]}\n"
     "  - {name: wifi, bandwidth: 2Mbps, nodes: [b]}\n",
     "media[1].name: 'wifi' is used by another medium already"),
    (TWO + "media:\n  - {name: wifi, bandwidth: 1Mbps, nodes: [a]}\n"
     "  - {name: radio, bandwidth: 2Mbps, nodes: [b, a]}\n",
     "media[1].nodes[1]: 'a' is on medium 'wifi' already; a node may be on one medium only"),
    (TWO + "media: [{name: wifi, bandwidth: 1Mbps, nodes: [a, a]}]\n",
     "media[0].nodes[1]: 'a' is on medium 'wifi' already"),
    # the file as a whole
    ("nodes: []\n", "nodes: [] is not a non-empty list of nodes"),
    ("links: {}\n", "nodes: None is not a non-empty list of nodes"),
    ("- a\n- b\n", "the top level must be a mapping with a 'nodes' list, not list"),
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("nodes:\n  - {name: a\n", "line 3: YAML syntax error"),
    ("nodes:\n" + NODE_A + "nodes: []\n", "line 3: YAML syntax error: key 'nodes' is given twice"),
])
def test_mistakes(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ClusterSpecError) as caught:
        load_cluster(write(tmp_path, text))
    text_of_error = str(caught.value)
    assert text_of_error.startswith(f"{tmp_path / 'nodes.yaml'}: ")
    assert message in text_of_error
    assert "\n" not in text_of_error


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ClusterSpecError, match="nodes.yaml: no such file"):
        load_cluster(tmp_path / "nodes.yaml")


def test_memory_for_stages_takes_each_workers_own_memory_off(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, GOOD))
    left = memory_for_stages(cluster, {"camera": 100 * 2**20, "box": 5 * 10**9})
    memory = {node.name: node.memory_bytes for node in left.nodes}
    assert memory == {
        "camera": 412 * 2**20,  # as it reported
        "gateway": 2**30 - WORKER_OVERHEAD_BYTES,  # did not report: the default
        "box": 0,  # the worker alone fills it
    }
    assert left.links == cluster.links and left.source == cluster.source
