"""Kernel isolation without the kernel: the stretch, the quotas, the state record, and the
one line saying why ``--isolation kernel`` cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator import isolation
from coordinator.cli import main
from coordinator.isolation import (
    HOST_SHARE,
    CpuGroups,
    IsolationError,
    check_available,
    cores_wanted,
    cpu_stretch,
    with_stretched_speeds,
)
from partition.cluster import parse_cluster


@pytest.mark.parametrize(("speeds", "cores", "expected"), [
    ([0.5, 0.25], 2, 1.0),                 # 0.75 cores of 1.4: as they are
    ([0.7, 0.7], 2, 1.0),                  # exactly 70%: as they are
    ([1.0, 1.0, 0.5, 0.5], 2, 1.4 / 3.0),  # 3 cores wanted, 1.4 allowed
    ([0.5] * 4, 1, 0.35),
    ([1.0] * 4, 16, 1.0),
])
def test_stretch_fits_the_quotas_in_70_percent_of_the_host(
    speeds: list[float], cores: int, expected: float
) -> None:
    stretch = cpu_stretch(sum(speeds), cores)
    assert stretch == pytest.approx(expected)
    groups = CpuGroups(Path("/unused"), stretch, sum(speeds), cores)
    shares = [quota / period for quota, period in
              (groups.limits_us(speed, threads=1) for speed in speeds)]
    assert sum(shares) <= HOST_SHARE * cores * (1 + 1e-3)  # rounding
    # Every node slows by the same factor: the speeds keep their ratios.
    assert [s / shares[0] for s in shares] == pytest.approx([s / speeds[0] for s in speeds],
                                                            rel=1e-3)


def test_a_stretched_cluster_fits_as_it_is() -> None:
    cluster = parse_cluster({
        "nodes": [{"name": "a", "address": "127.0.0.1:1", "memory": "1GiB", "threads": 2},
                  {"name": "b", "address": "127.0.0.1:2", "memory": "1GiB", "speed": 0.5}],
        "links": {"default": {"bandwidth": "1Gbps", "latency": "1ms"}},
    }, "test")
    assert cores_wanted(cluster) == 2.5
    stretch = cpu_stretch(cores_wanted(cluster), 2)
    fitted = with_stretched_speeds(cluster, stretch)
    assert [n.speed for n in fitted.nodes] == pytest.approx([stretch, 0.5 * stretch])
    assert cores_wanted(fitted) == pytest.approx(HOST_SHARE * 2)
    assert cpu_stretch(cores_wanted(fitted), 2) == pytest.approx(1.0)


def test_stretch_needs_a_positive_demand() -> None:
    with pytest.raises(ValueError, match="speeds must be positive"):
        cpu_stretch(0.0, 2)


def test_quota_counts_threads_and_stretch() -> None:
    groups = CpuGroups(Path("/unused"), 0.5, 4.0, 2)
    # The shortest period that gives a quota of 1 ms: 1/8 of a core, 8 ms.
    assert groups.limits_us(0.25, threads=1) == (1_000, 8_000)
    assert groups.limits_us(1.0, threads=4) == (2_000, 1_000)  # no period under 1 ms
    assert groups.limits_us(0.3, threads=1) == (1_000, 6_667)  # 0.15 of a core
    with pytest.raises(IsolationError, match="smallest quota allows"):
        groups.limits_us(0.001, threads=1)


def test_stretch_line_names_the_factor_and_why() -> None:
    assert CpuGroups(Path("/unused"), 1.0, 0.75, 2).stretch_line() is None
    line = CpuGroups(Path("/unused"), 1.4 / 3, 3.0, 2).stretch_line()
    assert line is not None and "\n" not in line
    assert "stretched by 0.467" in line and "want 3 cores" in line and "70%" in line


def test_state_record_round_trips_and_refuses_foreign_paths(tmp_path: Path) -> None:
    groups = CpuGroups(tmp_path / "edgesplit-1-abc", 0.5, 2.8, 2)
    assert CpuGroups.from_dict(groups.to_dict(), root=tmp_path) == groups
    for path in (tmp_path / "system.slice", Path("/etc/edgesplit-1-abc")):
        with pytest.raises(ValueError, match="not an edgesplit group"):
            CpuGroups.from_dict({**groups.to_dict(), "path": str(path)}, root=tmp_path)


def test_unavailable_says_why_and_to_use_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(IsolationError, match="cpu controller mounted at .*; use --isolation none"):
        check_available(tmp_path)  # no cpu.cfs_quota_us there
    monkeypatch.setattr(isolation.os, "geteuid", lambda: 1000)
    with pytest.raises(IsolationError, match="needs root .*; use --isolation none"):
        check_available(tmp_path)
    monkeypatch.setattr(isolation.sys, "platform", "darwin")
    with pytest.raises(IsolationError, match="needs Linux cgroups, not darwin"):
        check_available(tmp_path)


def test_up_without_kernel_isolation_is_one_line_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("nodes:\n  - {name: a, address: '127.0.0.1:1', memory: 1GiB}\n"
                     "links:\n  default: {bandwidth: 1Gbps, latency: 1ms}\n")
    monkeypatch.setenv("EDGESPLIT_STATE", str(tmp_path / "state"))
    monkeypatch.setattr(isolation.sys, "platform", "linux")
    monkeypatch.setattr(isolation.os, "geteuid", lambda: 1000)
    assert main(["up", "--isolation", "kernel", str(nodes)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["coordinator: error: --isolation kernel needs root to make cgroups; use "
                   "--isolation none"], err
    assert not (tmp_path / "state" / "cluster.json").exists()
    assert not list(tmp_path.glob("state/*.log"))  # no worker was started
