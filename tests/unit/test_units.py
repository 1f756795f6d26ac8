"""Parsing and formatting human units."""

from __future__ import annotations

import doctest

import pytest

from partition import units
from partition.units import (
    format_bytes,
    parse_bandwidth,
    parse_duration,
    parse_size,
)


def test_doctests() -> None:
    assert doctest.testmod(units).failed == 0


@pytest.mark.parametrize("text, expected", [
    ("2GiB", 2 * 1024**3),
    ("512MB", 512 * 10**6),
    ("1.5 GB", 1_500_000_000),
    ("100KiB", 102_400),
    ("100kB", 100_000),
    ("64 MiB", 64 * 1024**2),
    ("1TiB", 1024**4),
    ("10B", 10),
    ("10 bytes", 10),
    ("4096", 4096),
    (4096, 4096),
])
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["2 GiBs", "2GHz", "1.5", "GiB", "", "2 G B", True, 1.5, None])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError, match=r"is not a size \(examples: 512MiB, 2GiB, 4GB\)"):
        parse_size(text)


@pytest.mark.parametrize("text, expected", [
    ("100Mbps", 12.5e6),
    ("1Gbps", 125e6),
    ("8 Mbit/s", 1e6),
    ("8 Mb/s", 1e6),
    ("12.5MB/s", 12.5e6),
    ("1 GiB/s", 1024.0**3),
    ("1 Gibit/s", 1024.0**3 / 8),
    ("800kbps", 1e5),
    ("10MBps", 1e7),
    ("1000 bytes/s", 1000.0),
])
def test_bandwidths(text: str, expected: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["100", 100, "100M", "100 Mbpss", "fast", "1Gb"])
def test_bad_bandwidths(text: object) -> None:
    with pytest.raises(ValueError, match="is not a bandwidth"):
        parse_bandwidth(text)


@pytest.mark.parametrize("text, expected", [
    ("2ms", 0.002), ("1.5s", 1.5), ("300us", 3e-4), ("300µs", 3e-4), ("50ns", 5e-8),
    ("0", 0.0), (0, 0.0), (0.0, 0.0), ("0 ms", 0.0), ("-1ms", -0.001),
])
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["2", 2, "2 sec", "2h", "ms", None, False])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_formatting() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024**2) == "1.0 MiB"
    assert format_bytes(5 * 1024**4) == "5.0 TiB"
    assert format_bytes(float("inf")) == "inf"
